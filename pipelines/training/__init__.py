"""Training on Ray Train + DeepSpeed: the shared loop, guard SFT and chat SFT, MDPO / DPO, the guard
format, and the offline tiny models the tests and demos train."""
