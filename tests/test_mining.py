"""Triplet mining: furthest-neighbour identity, sharding, exact reference, sampler, Parquet, recall."""
from __future__ import annotations

import numpy as np
import pytest

from step_ray.config import ConfigError, load_config
from step_ray.mining import (
    MiningConfig,
    Neighbours,
    ShardIndex,
    TripletSampler,
    array_chunks,
    close_recall,
    exact_neighbours,
    far_precision,
    mine_neighbours,
)
from step_ray.mining.index import augment_database, augment_queries


def _brute_force(x: np.ndarray, k_close: int, k_far: int):
    """float64 numpy reference over a small in-memory array, self excluded."""
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    near, far = d.copy(), d.copy()
    np.fill_diagonal(near, np.inf)
    np.fill_diagonal(far, -np.inf)
    close_ids = np.argsort(near, axis=1, kind="stable")[:, :k_close]
    far_ids = np.argsort(-far, axis=1, kind="stable")[:, :k_far]
    return close_ids, np.take_along_axis(d, close_ids, 1), far_ids, np.take_along_axis(d, far_ids, 1)


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 4.0
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def random_data():
    return np.random.default_rng(0).standard_normal((500, 32)).astype(np.float32)


# -- the furthest-neighbour identity -------------------------------------------------------------------


def test_augmented_inner_product_is_distance_minus_query_norm(random_data):
    x, q = random_data[:200].astype(np.float64), random_data[200:230].astype(np.float64)
    norms = (x * x).sum(1)
    ip = (augment_queries(q.astype(np.float32)).astype(np.float64)
          @ augment_database(x.astype(np.float32), norms.astype(np.float32)).T.astype(np.float64))
    dist = ((q[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(ip + (q * q).sum(1)[:, None], dist, rtol=1e-5, atol=1e-4)


def test_flat_furthest_and_nearest_equal_brute_force(random_data):
    cfg = MiningConfig(k_close=5, k_far=40)
    nb = mine_neighbours(random_data, cfg)
    close_ids, close_d, far_ids, far_d = _brute_force(random_data, 5, 40)
    np.testing.assert_array_equal(nb.far_ids, far_ids)
    np.testing.assert_array_equal(nb.close_ids, close_ids)
    np.testing.assert_allclose(nb.far_dist, far_d, rtol=1e-4)
    np.testing.assert_allclose(nb.close_dist, close_d, rtol=1e-4)
    assert (np.diff(nb.close_dist, axis=1) >= 0).all() and (np.diff(nb.far_dist, axis=1) <= 0).all()
    rows = np.arange(len(random_data))[:, None]
    assert not (nb.close_ids == rows).any() and not (nb.far_ids == rows).any()


def test_self_excluded_by_id_among_duplicates():
    # 30 copies of one vector: rank 0 of a copy's nearest list may be any copy, not necessarily itself.
    rng = np.random.default_rng(1)
    x = np.concatenate([np.repeat(rng.standard_normal((1, 8)), 30, 0), rng.standard_normal((70, 8))]).astype(np.float32)
    nb = mine_neighbours(x, MiningConfig(k_close=5, k_far=13))
    rows = np.arange(len(x))[:, None]
    assert not (nb.close_ids == rows).any() and not (nb.far_ids == rows).any()
    assert (nb.close_ids[:30] < 30).all() and np.allclose(nb.close_dist[:30], 0.0, atol=1e-5)
    assert all(len(set(r)) == len(r) for r in nb.close_ids)


def test_k_far_beyond_the_gpu_limit_on_cpu(monkeypatch):
    """The 2,048 cap is FAISS GPU's k-selection limit: the CPU flat index mines a larger far set, and only a
    GPU index refuses one (with a line that says what to do)."""
    from step_ray.mining import ShardIndex
    from step_ray.mining import index as index_module

    x = _clustered(2600, 16, 10, seed=2)
    nb = mine_neighbours(x, MiningConfig(k_close=5, k_far=2500, query_batch=512))
    ref = exact_neighbours(x[:50], array_chunks(x, 700), 5, 2500, query_ids=np.arange(50))
    assert nb.far_ids.shape == (2600, 2500)
    assert all(len(set(r)) == len(r) for r in nb.far_ids[:50])
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)  # as a GPU node reports (no GPU index is built)
    with pytest.raises(ValueError, match="FAISS GPU index returns at most 2048"):
        ShardIndex(x[:100], 0, MiningConfig(k_far=2500))
    assert far_precision(nb.far_ids[:50], ref.far_ids) > 0.999  # float32 near-ties at the boundary only
    np.testing.assert_array_equal(nb.close_ids[:50], ref.close_ids)


# -- approximate indexes -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_indexes_recall_on_clustered_data(kind):
    x = _clustered(3000, 32, 20, seed=3)
    cfg = MiningConfig(index=kind, k_close=5, k_far=50, nprobe=16, pq_m=8, pq_bits=6, refine_factor=8)
    nb = mine_neighbours(x, cfg)
    ref = exact_neighbours(x, array_chunks(x, 1000), 5, 50, query_ids=np.arange(len(x)))
    assert close_recall(nb.close_ids, ref.close_ids) >= 0.9
    assert far_precision(nb.far_ids, ref.far_ids) >= 0.9
    rows = np.arange(len(x))[:, None]
    assert not (nb.close_ids == rows).any() and (nb.far_ids >= 0).all()


def test_ivf_rows_left_short_are_completed_exactly():
    # One probed list cannot hold 400 furthest vectors: the short rows must be completed, not padded.
    x = _clustered(1200, 16, 8, seed=4)
    shard = ShardIndex(x, 0, MiningConfig(index="ivf", nlist=30, nprobe=1, far_nprobe=1, k_far=400))
    ids, dist = shard.search_far(x[:20], np.arange(20), 400)
    assert (ids >= 0).all() and np.isfinite(dist).all()
    assert not (ids == np.arange(20)[:, None]).any()
    assert all(len(set(r)) == 400 for r in ids)


# -- sharding ------------------------------------------------------------------------------------------


def test_sharded_equals_single_index(ray_session, random_data):
    single = mine_neighbours(random_data, MiningConfig(k_close=5, k_far=13, num_shards=1))
    sharded = mine_neighbours(random_data, MiningConfig(k_close=5, k_far=13, num_shards=3, query_batch=128))
    np.testing.assert_array_equal(sharded.close_ids, single.close_ids)
    np.testing.assert_array_equal(sharded.far_ids, single.far_ids)
    np.testing.assert_allclose(sharded.close_dist, single.close_dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded.far_dist, single.far_dist, rtol=1e-5, atol=1e-5)


def test_sharded_needs_ray_when_not_initialised(random_data, monkeypatch):
    import ray

    # Whether another test started Ray already must not matter: pretend it is down.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="needs Ray"):
        mine_neighbours(random_data, MiningConfig(num_shards=2))


# -- exact reference -----------------------------------------------------------------------------------


def test_exact_reference_streams_chunks_and_matches_brute_force(random_data):
    queries = np.arange(0, 500, 7)
    # A one-shot generator: the reference must not need to see the database twice or all at once.
    chunks = (random_data[s : s + 64] for s in range(0, 500, 64))
    ref = exact_neighbours(random_data[queries], chunks, 5, 13, query_ids=queries, dtype=__import__("torch").float64)
    close_ids, close_d, far_ids, far_d = _brute_force(random_data, 5, 13)
    np.testing.assert_array_equal(ref.close_ids, close_ids[queries])
    np.testing.assert_array_equal(ref.far_ids, far_ids[queries])
    np.testing.assert_allclose(ref.close_dist, close_d[queries], rtol=1e-5)
    np.testing.assert_allclose(ref.far_dist, far_d[queries], rtol=1e-5)
    with pytest.raises(ValueError, match="too small"):
        exact_neighbours(random_data[:3], array_chunks(random_data[:10], 4), 5, 13)


def test_recall_metrics():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[1, 2, 3, 9], [5, 6, 7, 8]])
    assert close_recall(approx, exact) == pytest.approx(7 / 8)
    assert far_precision(approx, exact) == pytest.approx(7 / 8)


# -- sampler -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mined(random_data):
    return mine_neighbours(random_data, MiningConfig(k_close=5, k_far=13))


def test_sampler_draws_positives_from_close_and_negatives_from_far(mined):
    sampler = TripletSampler.from_neighbours(mined, seed=7)
    n = len(mined)
    pos_rank_counts = np.zeros(mined.k_close)
    neg_rank_counts = np.zeros(mined.k_far)
    for epoch in range(40):
        t = sampler.epoch_triplets(epoch)
        assert t.shape == (n, 3) and t.dtype == np.int64
        np.testing.assert_array_equal(np.sort(t[:, 0]), np.arange(n))  # every anchor once
        pos_match = mined.close_ids[t[:, 0]] == t[:, 1:2]
        neg_match = mined.far_ids[t[:, 0]] == t[:, 2:3]
        assert pos_match.any(1).all() and neg_match.any(1).all()
        pos_rank_counts += pos_match.sum(0)
        neg_rank_counts += neg_match.sum(0)
    # Uniform over ranks: 40·500 draws, each rank's share within 15% of its expectation.
    draws = 40 * n
    assert np.all(np.abs(pos_rank_counts / (draws / mined.k_close) - 1) < 0.15)
    assert np.all(np.abs(neg_rank_counts / (draws / mined.k_far) - 1) < 0.15)


def test_sampler_deterministic_and_sharded_by_rank(mined):
    n = len(mined)  # 500, not a multiple of 3
    a = TripletSampler(mined.close_ids, mined.far_ids, seed=3).epoch_triplets(5)
    b = TripletSampler(mined.close_ids, mined.far_ids, seed=3).epoch_triplets(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, TripletSampler(mined.close_ids, mined.far_ids, seed=3).epoch_triplets(6))
    assert not np.array_equal(a, TripletSampler(mined.close_ids, mined.far_ids, seed=4).epoch_triplets(5))

    shares = [TripletSampler(mined.close_ids, mined.far_ids, seed=3, rank=r, world_size=3) for r in range(3)]
    parts = [s.epoch_triplets(5) for s in shares]
    assert {len(p) for p in parts} == {len(shares[0])} == {167}
    anchors = np.concatenate([p[:, 0] for p in parts])
    assert set(anchors) == set(range(n)) and len(anchors) == 501  # one anchor padded in
    # The ranks together draw exactly the single-process epoch, padded.
    merged = np.empty((501, 3), np.int64)
    for r, p in enumerate(parts):
        merged[r::3] = p
    np.testing.assert_array_equal(merged[:n], a)

    dropped = [TripletSampler(mined.close_ids, mined.far_ids, seed=3, rank=r, world_size=3, drop_last=True)
               for r in range(3)]
    anchors = np.concatenate([s.epoch_triplets(5)[:, 0] for s in dropped])
    assert len(anchors) == len(set(anchors)) == 498


def test_sampler_state_dict_and_iteration(mined):
    sampler = TripletSampler(mined.close_ids, mined.far_ids, seed=11)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    other = TripletSampler(mined.close_ids, mined.far_ids, seed=0)
    other.load_state_dict(state)
    assert other.seed == 11 and other.epoch == 4
    np.testing.assert_array_equal(np.array(list(other)), sampler.epoch_triplets(4))
    smaller = TripletSampler(mined.close_ids[:100] % 100, mined.far_ids[:100] % 100, seed=0)
    with pytest.raises(ValueError, match="num_anchors"):
        smaller.load_state_dict(state)


def test_sampler_rejects_bad_input(mined):
    with pytest.raises(ValueError):
        TripletSampler(mined.close_ids, mined.far_ids[:10])
    with pytest.raises(ValueError):
        TripletSampler(mined.close_ids + 1000, mined.far_ids)
    with pytest.raises(ValueError):
        TripletSampler(mined.close_ids, mined.far_ids, rank=2, world_size=2)


# -- config and Parquet --------------------------------------------------------------------------------


def test_config_validation_and_overrides(random_data):
    cfg = load_config(MiningConfig, None, ["k_far=2048", "index=ivf", "num_shards=2"])
    assert cfg.k_far == 2048 and cfg.index == "ivf" and cfg.k_close == 5
    assert MiningConfig().k_close == 5 and MiningConfig().k_far == 13
    for bad in (["k_far=0"], ["k_close=0"], ["index=hnsw"], ["num_shards=0"], ["use_gpu=yes"]):
        with pytest.raises(ConfigError):
            load_config(MiningConfig, None, bad)
    with pytest.raises(ValueError, match="more than"):
        mine_neighbours(random_data[:10], MiningConfig(k_far=13))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_neighbours_parquet_round_trip(where, mined, tmp_path, request):
    if where == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/mining/neighbours.parquet"
    else:
        uri = str(tmp_path / "neighbours.parquet")
    names = [f"train/{i:05d}" for i in range(len(mined))]
    mined.save(uri, names)
    back = Neighbours.load(uri)
    assert back.image_ids == names
    for field in ("close_ids", "close_dist", "far_ids", "far_dist"):
        np.testing.assert_array_equal(getattr(back, field), getattr(mined, field))
    assert back.close_ids.dtype == np.int64 and back.far_dist.dtype == np.float32
