"""The generator–classifier loop (CHILLGuard §4.3): generation, levels, pairs, MDPO, retraining."""
