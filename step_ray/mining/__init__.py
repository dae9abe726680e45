"""Triplet mining (docs/method.md §3): close and far sets under the style distance with sharded FAISS indexes."""
from step_ray.mining.config import MAX_K, MineTripletsJobConfig, MiningConfig
from step_ray.mining.exact import ExactAccumulator, array_chunks, close_recall, exact_neighbours, far_precision
from step_ray.mining.index import ShardIndex, faiss_gpu_count
from step_ray.mining.job import load_neighbours, mine_triplets
from step_ray.mining.neighbours import Neighbours, mine_neighbours
from step_ray.mining.sampler import TripletSampler

__all__ = [
    "ExactAccumulator",
    "MAX_K",
    "MineTripletsJobConfig",
    "MiningConfig",
    "Neighbours",
    "ShardIndex",
    "TripletSampler",
    "array_chunks",
    "close_recall",
    "exact_neighbours",
    "faiss_gpu_count",
    "far_precision",
    "load_neighbours",
    "mine_neighbours",
    "mine_triplets",
]
