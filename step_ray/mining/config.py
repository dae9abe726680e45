"""Configuration of triplet mining (docs/method.md §3): set sizes, FAISS index type, sharding, device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# FAISS GPU k-selection handles at most 2,048 results per query (GPU_MAX_SELECTION_K). Only an index on a
# GPU is bounded by it (step_ray.mining.index.ShardIndex checks); the CPU flat index has no such limit.
MAX_K = 2048


@dataclass(frozen=True)
class MiningConfig:
    """How the k_c nearest and k_f furthest images of every anchor are found.

    index: "flat" is exact (brute force inside FAISS); "ivf" and "ivfpq" are approximate and meant for
    large n; "auto" (the default) is flat while a shard holds at most `auto_flat_max` images and ivf
    beyond, where exact search grows as n² (137k images: ~19 TFLOP, minutes on a CPU; ivf: n·nprobe).
    `nlist` 0 picks ~4·sqrt(shard size) lists. The far side probes at least enough lists to hold
    2·(k_far + 1) vectors on average (`far_nprobe` 0 = that automatic value, never below `nprobe`).
    ivfpq stores `pq_m` sub-quantizer codes of `pq_bits` bits and re-ranks `refine_factor`·k candidates
    with the exact vectors (IndexRefineFlat), which is what brings its recall back up.
    use_gpu: "auto" puts every shard's indexes on a GPU when FAISS sees one; "never" keeps them on CPU.
    rerank_factor: when the descriptors end in a sketch of the PCA residual (`reduction.sketch`), the
    index returns rerank_factor·k_close close candidates, re-ranked by the sketched estimate of the
    exact distance (step_ray.mining.neighbours.rerank_with_sketch); ignored without a sketch.
    """

    k_close: int = 5
    k_far: int = 13
    index: Literal["auto", "flat", "ivf", "ivfpq"] = "auto"
    auto_flat_max: int = 20_000
    nlist: int = 0
    # 137k real-VGG synthetic descriptors, nlist 1,481, 500 anchors against exhaustive search: nprobe 16
    # gave close recall 0.912 / far precision 0.799, 32: 0.948 / 0.958, 64: 0.955 / 0.994, 128: 0.957 /
    # 0.996 (BENCHMARKS.md, "At scale"); 64 costs ~0.8 ms a query there.
    nprobe: int = 64
    far_nprobe: int = 0
    pq_m: int = 16
    pq_bits: int = 8
    refine_factor: int = 4
    rerank_factor: int = 4
    train_sample: int = 65_536  # vectors used to fit the IVF k-means and the PQ codebooks
    num_shards: int = 1
    query_batch: int = 4096
    use_gpu: Literal["auto", "never"] = "auto"
    seed: int = 0
    # The residual sketches (4·reduction.sketch bytes an image: 32 KB at the default, 4.5 GB at 137k images)
    # are re-ranked from memory while they fit in `sketch_memory_mb`, else from a file in `spill_dir` (a
    # local folder; empty: the system's temporary folder), read back with positioned reads (at 50k the
    # re-ranking took 72 s from disk, 87 s from memory on a busier machine: its arithmetic dominates, not
    # the reads; BENCHMARKS.md, "At scale"). Neither changes the neighbours.
    sketch_memory_mb: int = 4096
    spill_dir: str = ""

    def __post_init__(self):
        if self.sketch_memory_mb < 0:
            raise ValueError(f"sketch_memory_mb must be >= 0 (0: always on disk), got {self.sketch_memory_mb}")
        for name in ("k_close", "k_far"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.nlist < 0:
            raise ValueError(f"nlist must be >= 0 (0 = automatic), got {self.nlist}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.far_nprobe < 0:
            raise ValueError(f"far_nprobe must be >= 0 (0 = automatic), got {self.far_nprobe}")
        if self.pq_m < 1:
            raise ValueError(f"pq_m must be >= 1, got {self.pq_m}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must be in [1, 16], got {self.pq_bits}")
        if self.refine_factor < 1:
            raise ValueError(f"refine_factor must be >= 1, got {self.refine_factor}")
        if self.rerank_factor < 1:
            raise ValueError(f"rerank_factor must be >= 1, got {self.rerank_factor}")
        if self.train_sample < 1:
            raise ValueError(f"train_sample must be >= 1, got {self.train_sample}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.query_batch < 1:
            raise ValueError(f"query_batch must be >= 1, got {self.query_batch}")

    def resolved_index(self, shard_size: int) -> str:
        """The index a shard of `shard_size` images gets: `index`, with "auto" settled by size."""
        if self.index != "auto":
            return self.index
        return "flat" if shard_size <= self.auto_flat_max else "ivf"

    def check_database_size(self, n: int) -> None:
        """The close and far sets exclude the anchor itself, so both need n - 1 other images."""
        if n - 1 < max(self.k_close, self.k_far):
            raise ValueError(
                f"mining needs more than max(k_close, k_far) = {max(self.k_close, self.k_far)} images, got {n}"
            )
        if self.num_shards > n:
            raise ValueError(f"num_shards ({self.num_shards}) exceeds the number of images ({n})")


@dataclass(frozen=True)
class MineTripletsJobConfig:
    """The mining job: style-statistics output in, close/far neighbour lists (Parquet) out.

    `descriptors` is the output folder of the style-statistics job (local or s3://), streamed one row
    group at a time (`step_ray.mining.job.read_for_mining`); only rows of `split` are mined. `output` receives
    `neighbours.parquet` and `metadata.json`; an output written with the same config hash is kept.
    """

    descriptors: str = ""
    output: str = ""
    split: str = "train"
    mining: MiningConfig = field(default_factory=MiningConfig)

    def __post_init__(self):
        if not self.descriptors:
            raise ValueError("descriptors (the style-statistics output folder) must be set")
        if not self.output:
            raise ValueError("output must be set")
