"""cluster/prometheus.py: the one reader of Prometheus text exports (benchmarks and tests)."""

from __future__ import annotations

from cluster.prometheus import metric_sum, prefix_cache_counters, settled, vllm_counter

EXPORT = '''# HELP ray_chillguard_serve_requests_total requests
# TYPE ray_chillguard_serve_requests_total counter
ray_chillguard_serve_requests_total{route="moderations",status="200"} 3.0
ray_chillguard_serve_requests_total{route="moderations",status="503"} 1.0
ray_chillguard_serve_requests_total{route="guard",status="200",note="a \\"quoted\\" value"} 2.0
# TYPE ray_chillguard_serve_batch_size histogram
ray_chillguard_serve_batch_size_bucket{call="first_token",le="1.0"} 1.0
ray_chillguard_serve_batch_size_bucket{call="first_token",le="+Inf"} 2.0
ray_chillguard_serve_batch_size_sum{call="first_token"} 33.0
ray_chillguard_serve_batch_size_count{call="first_token"} 2.0
ray_vllm:prefix_cache_hits_total{model_name="g"} 90.0
ray_vllm_prefix_cache_hits_total{model_name="h"} 10.0
ray_vllm_prefix_cache_queries_total{model_name="h"} 40.0
vllm:num_requests_running 4.0
'''


def test_sums_samples_by_name_and_labels():
    assert metric_sum(EXPORT, "ray_chillguard_serve_requests_total") == 6.0
    assert metric_sum(EXPORT, "ray_chillguard_serve_requests_total", route="moderations", status="200") == 3.0
    assert metric_sum(EXPORT, "ray_chillguard_serve_requests_total", note='a "quoted" value') == 2.0
    assert metric_sum(EXPORT, "ray_chillguard_serve_batch_size_sum", call="first_token") == 33.0
    assert metric_sum(EXPORT, "ray_chillguard_serve_batch_size_count", call="first_token") == 2.0
    assert metric_sum(EXPORT, "ray_vllm:prefix_cache_hits_total") == 90.0
    assert metric_sum(EXPORT, "vllm:num_requests_running") == 4.0
    assert metric_sum(EXPORT, "ray_chillguard_serve_requests_total", route="nowhere") == 0.0
    assert metric_sum(EXPORT, "absent_total", default=None) is None


def test_a_vllm_counter_under_either_of_rays_names():
    assert vllm_counter(EXPORT, "prefix_cache_hits") == 100.0  # ray_vllm: + ray_vllm_ (two Ray versions' names)
    assert vllm_counter(EXPORT, "prefix_cache_queries") == 40.0
    assert vllm_counter(EXPORT, "num_preemptions") is None


def test_prefix_cache_counters_before_the_first_hit():
    assert prefix_cache_counters(EXPORT) == (100.0, 40.0)
    # Ray exports a counter from its first increment: queries without a hits line are 0 hits
    short_prompts = "\n".join(line for line in EXPORT.splitlines() if "prefix_cache_hits" not in line)
    assert prefix_cache_counters(short_prompts) == (0.0, 40.0)
    assert prefix_cache_counters("vllm:num_requests_running 4.0\n") is None  # no engine exported yet


def test_settled_reads_until_two_reads_agree():
    reads = iter([1, 2, 2, 3])
    assert settled(lambda: next(reads), every_s=0, timeout_s=5) == 2
    climbing = iter(range(1000))
    assert settled(lambda: next(climbing), every_s=0.01, timeout_s=0.05) >= 1  # never settles: the last read
