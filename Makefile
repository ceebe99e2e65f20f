# Makefile: every build, test, bench and reproduction target.
#   make              build everything this machine can build (CPU trainer, upcycle; GPU trainer if nvcc)
#   make test         every test: CPU, data, CUDA compile check, and the GPU code run in the CUDA
#                     emulation (docs/emulation.md; no GPU needed). `make test-emu`: the emulated part only
#   make fuzz         libFuzzer harnesses for every parser of outside bytes, FUZZ_SECONDS each (default 60;
#                     needs clang). make test runs a 20 s pass. docs/reliability.md
#   make test-san     the CPU test suites with the binaries built under AddressSanitizer + UBSan (build/san/)
#   make test-gpu     GPU tests (needs an NVIDIA GPU; see docs/gpu-log.md)
#   make bench        GPU throughput table
#   make bench-cpu    CPU trainer throughput (dev/bench/bench_cpu.sh; LLMC=<llm.c dir> adds llm.c)
#   make quickstart   the README's first command (tiny Drop-Upcycling Table 1)
#   make repro-tiny   every reproduction at the tiny preset (CPU, minutes each)
#   make repro-small  every reproduction at the small preset (one H100/H200, about an hour each)
#   make repro-grids-tiny   the two scaling-law grids at the tiny preset (CPU, 1 thread, ~20 minutes)
#   make repro-grids-small  the two grids at the small preset (one GPU, hours: see the scripts)
CXX ?= g++
NVCC ?= nvcc
PYTHON ?= python3
# -fno-math-errno: nothing reads errno after a math call, and without it gcc cannot vectorize
# a loop with std::sqrt (AdamW's update). -fno-trapping-math: nothing reads the floating-point
# exception flags, and without it gcc keeps the comparisons of exp_real (train_moe.cpp) as
# branches, so the loops of exps do not vectorize. -fno-plt: the remaining libm calls jump
# through the GOT directly. None of the three changes a result (the same operations, rounded
# the same way), only whether gcc may vectorize them.
CXXFLAGS ?= -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -fno-plt -Wall -Wextra -Wno-unused-parameter
# Hopper by default; pass GPU_ARCH explicitly for other GPUs (no auto-detection to go wrong)
GPU_ARCH ?= -gencode arch=compute_90,code=sm_90
NVCCFLAGS ?= -std=c++17 -O3 $(GPU_ARCH) --expt-relaxed-constexpr -Xcompiler -fopenmp -Xcompiler -Wall
# NCCL: data parallelism over several GPUs. cuDNN is not linked: attention is hand-written.
# USE_MPI=1 adds --nccl-init mpi (MPI_Bcast of the NCCL id; needs mpicxx): mpirun works
# without it too, through its variables and the default --nccl-init tcp.
# NCCL_FLAGS: where NCCL is not in the CUDA toolkit, e.g. pip's nvidia-nccl wheel:
#   NCCL_FLAGS="-I$D/include -L$D/lib -Xlinker -rpath=$D/lib -l:libnccl.so.2"
NCCL_FLAGS ?= -lnccl
CUDA_LIBS ?= -lcublas -lcublasLt $(NCCL_FLAGS) -lgomp
ifdef USE_MPI
NVCCFLAGS += -DUSE_MPI $(shell mpicxx --showme:compile 2>/dev/null)
CUDA_LIBS += $(shell mpicxx --showme:link 2>/dev/null)
endif
HAVE_NVCC := $(shell command -v $(NVCC) 2>/dev/null)

COMMON := $(wildcard common/*.h)
KERNELS := $(wildcard kernels/*.cuh)
DEV_CUDA := $(wildcard dev/cuda/*.cu)

.PHONY: all test test-cpu test-gpu cuda-check emu test-emu bench bench-cpu quickstart clean fixtures repro-tiny \
        repro-small repro-grids-tiny repro-grids-small fuzz fuzz-build test-san san
all: train_moe generate $(if $(wildcard upcycle.cu),upcycle) $(if $(HAVE_NVCC),$(if $(wildcard train_moe.cu),train_moe_gpu generate_gpu))

include dev/data/data.mk

train_moe: train_moe.cpp $(COMMON)
	$(CXX) $(CXXFLAGS) -o $@ $<

# text from a trained model, with the CPU trainer's model code and a KV cache
generate: generate.cpp train_moe.cpp $(COMMON)
	$(CXX) $(CXXFLAGS) -o $@ $<

# upcycle is host code: g++ builds it on machines without CUDA
upcycle: upcycle.cu train_moe.cpp $(COMMON)
	$(CXX) $(CXXFLAGS) -x c++ -o $@ $<

train_moe_gpu: train_moe.cu $(COMMON) $(KERNELS)
	$(NVCC) $(NVCCFLAGS) -o $@ $< $(CUDA_LIBS)

# generate.cpp again, with the GPU trainer's model code
generate_gpu: generate.cpp train_moe.cu $(COMMON) $(KERNELS)
	$(NVCC) $(NVCCFLAGS) -x cu -DGENERATE_GPU -o $@ $< $(CUDA_LIBS)

test/bin/test_cpu: test/test_cpu.cpp test/testing.h test/fixture.h train_moe.cpp $(COMMON)
	@mkdir -p test/bin
	$(CXX) $(CXXFLAGS) -o $@ $<

# the finite-difference check runs the same trainer code in double precision
test/bin/test_gradcheck: test/test_gradcheck.cpp test/testing.h test/fixture.h train_moe.cpp $(COMMON)
	@mkdir -p test/bin
	$(CXX) $(CXXFLAGS) -DTRAIN_MOE_DOUBLE -o $@ $<

# common/bpe.h's encoder as a filter, checked against `tokenizers` by test/test_tokenizer.py
test/bin/test_bpe: test/test_bpe.cpp common/bpe.h common/json.h common/util.h
	@mkdir -p test/bin
	$(CXX) $(CXXFLAGS) -o $@ $<

test/bin/test_upcycle: test/test_upcycle.cpp test/testing.h upcycle.cu train_moe.cpp $(COMMON)
	@mkdir -p test/bin
	$(CXX) $(CXXFLAGS) -o $@ $<

# compile (and link) every CUDA file: the check CI can do without a GPU. One target per
# file, so `make -j cuda-check` compiles them in parallel; on a GPU, test/test_gpu.sh runs
# test_gpu_fixtures and the dev/cuda binaries from build/cuda-check/, dev/bench/bench.sh bench_gpu.
CUDA_CHECK_BINS := build/cuda-check/train_moe build/cuda-check/generate_gpu build/cuda-check/test_gpu_fixtures build/cuda-check/bench_gpu \
                   $(patsubst dev/cuda/%.cu,build/cuda-check/%,$(DEV_CUDA))
ifeq ($(HAVE_NVCC),)
cuda-check:
	@echo "cuda-check: nvcc not found, skipping"
else
cuda-check: $(CUDA_CHECK_BINS)
	@echo "cuda-check: all CUDA files compiled"

build/cuda-check/train_moe: train_moe.cu $(COMMON) $(KERNELS)
	@mkdir -p build/cuda-check
	@echo "nvcc $<"
	@$(NVCC) $(NVCCFLAGS) -o $@ $< $(CUDA_LIBS)

build/cuda-check/generate_gpu: generate.cpp train_moe.cu $(COMMON) $(KERNELS)
	@mkdir -p build/cuda-check
	@echo "nvcc $<"
	@$(NVCC) $(NVCCFLAGS) -x cu -DGENERATE_GPU -o $@ $< $(CUDA_LIBS)

build/cuda-check/test_gpu_fixtures: test/test_gpu_fixtures.cu test/fixture.h test/testing.h train_moe.cu $(COMMON) $(KERNELS)
	@mkdir -p build/cuda-check
	@echo "nvcc $<"
	@$(NVCC) $(NVCCFLAGS) -o $@ $< $(CUDA_LIBS)

build/cuda-check/bench_gpu: dev/bench/bench_gpu.cu train_moe.cu $(COMMON) $(KERNELS)
	@mkdir -p build/cuda-check
	@echo "nvcc $<"
	@$(NVCC) $(NVCCFLAGS) -o $@ $< $(CUDA_LIBS)

build/cuda-check/%: dev/cuda/%.cu dev/cuda/common.h train_moe.cpp $(COMMON) $(KERNELS)
	@mkdir -p build/cuda-check
	@echo "nvcc $<"
	@$(NVCC) $(NVCCFLAGS) -o $@ $< $(CUDA_LIBS)
endif

# ----------------------------------------------------------------------------
# CUDA emulation (docs/emulation.md): the GPU code compiled with g++ against dev/emu/cuda_emu.h
# and run on the CPU, so that `make test` executes every kernel and the GPU trainer without a
# GPU. dev/emu/cu2cpp.py mirrors the sources into build/emu/src with the launch syntax
# rewritten. EMU_SAN=1 builds the same binaries with AddressSanitizer + UBSan (build/emu-san).
CUDA_HOME ?= $(if $(HAVE_NVCC),$(abspath $(dir $(HAVE_NVCC))..),/usr/local/cuda)
EMU_DIR := build/emu$(if $(EMU_SAN),-san)
EMU_SRC := build/emu/src
EMU_CXXFLAGS ?= -std=c++17 $(if $(EMU_SAN),-O1 -g -fno-omit-frame-pointer -fsanitize=address$(,)undefined,-O2) \
                -fopenmp -Wall -Wno-unused-parameter -Wno-unused-variable -Wno-unused-function -Wno-unknown-pragmas -Wno-sign-compare
, := ,
EMU_HEADERS := $(wildcard dev/emu/*.h)
EMU_CC = $(CXX) $(EMU_CXXFLAGS) -x c++ -include dev/emu/cuda_emu.h -I$(CUDA_HOME)/include
DEV_CUDA_NAMES := $(patsubst dev/cuda/%.cu,%,$(DEV_CUDA))
EMU_BINS := $(EMU_DIR)/train_moe_gpu $(EMU_DIR)/generate_gpu $(EMU_DIR)/test_emu $(EMU_DIR)/test_gpu_fixtures $(EMU_DIR)/bench_gpu \
            $(addprefix $(EMU_DIR)/dev_cuda/,$(DEV_CUDA_NAMES))
HAVE_CUDA_HEADERS := $(wildcard $(CUDA_HOME)/include/cuda_runtime.h)
# with mpicxx: the trainer built with USE_MPI too, for the --nccl-init mpi test (test/test_dp.sh f)
HAVE_MPICXX := $(shell command -v mpicxx 2>/dev/null)
EMU_BINS += $(if $(HAVE_MPICXX),$(EMU_DIR)/train_moe_gpu_mpi)

$(EMU_SRC)/.stamp: dev/emu/cu2cpp.py train_moe.cu train_moe.cpp generate.cpp $(COMMON) $(KERNELS) $(DEV_CUDA) dev/cuda/common.h \
                   $(wildcard test/*.cu test/*.h) dev/bench/bench_gpu.cu
	@mkdir -p $(EMU_SRC)
	$(PYTHON) dev/emu/cu2cpp.py . $(EMU_SRC) train_moe.cu train_moe.cpp generate.cpp common kernels dev/cuda dev/bench test
	@touch $@
$(EMU_DIR)/train_moe_gpu: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -o $@ $(EMU_SRC)/train_moe.cu
$(EMU_DIR)/generate_gpu: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -DGENERATE_GPU -o $@ $(EMU_SRC)/generate.cpp
$(EMU_DIR)/train_moe_gpu_mpi: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -DUSE_MPI $(shell mpicxx --showme:compile 2>/dev/null) -o $@ $(EMU_SRC)/train_moe.cu $(shell mpicxx --showme:link 2>/dev/null)
$(EMU_DIR)/test_gpu_fixtures: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -o $@ $(EMU_SRC)/test/test_gpu_fixtures.cu
$(EMU_DIR)/test_emu: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -o $@ $(EMU_SRC)/test/test_emu.cu
$(EMU_DIR)/bench_gpu: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -o $@ $(EMU_SRC)/dev/bench/bench_gpu.cu
$(EMU_DIR)/dev_cuda/%: $(EMU_SRC)/.stamp $(EMU_HEADERS)
	@mkdir -p $(@D)
	$(EMU_CC) -o $@ $(EMU_SRC)/dev/cuda/$*.cu
emu: $(EMU_BINS)
# the emulated GPU suites alone (make test runs them too)
test-emu: emu train_moe
	EMU_DIR=$(EMU_DIR) SUITES=emu bash test/run_tests.sh

# ----------------------------------------------------------------------------
# Fuzzing (docs/reliability.md): one libFuzzer harness per parser of outside bytes
# (dev/fuzz/<name>.cpp), built with clang under ASan + UBSan; any UB report aborts, so the
# fuzzer keeps the input. `make fuzz` runs each for FUZZ_SECONDS on a scratch copy of its
# seed corpus (dev/fuzz/corpus/<name>/).
FUZZ_CXX ?= clang++
FUZZ_SECONDS ?= 60
FUZZ_FLAGS ?= -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_HARNESSES := json safetensors config shard tokenizer trainer_state
build/fuzz/%: dev/fuzz/%.cpp dev/fuzz/fuzz.h $(COMMON)
	@mkdir -p build/fuzz
	$(FUZZ_CXX) $(FUZZ_FLAGS) -o $@ $<
fuzz-build: $(addprefix build/fuzz/,$(FUZZ_HARNESSES))
fuzz: fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) HARNESSES="$(FUZZ_HARNESSES)" bash dev/fuzz/run_fuzz.sh

# ----------------------------------------------------------------------------
# The CPU programs and their tests built with AddressSanitizer + UBSan into build/san/ (the
# normal binaries stay as they are); `make test-san` runs the CPU suites with them.
# -fno-sanitize-recover: a UB report fails the test instead of scrolling past. g++ leaves
# float-cast-overflow (a double out of an integer's range cast to it) out of "undefined":
# named here, because that is the UB a number read from a file most easily causes.
SAN_CXXFLAGS ?= -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow \
                -fno-sanitize-recover=undefined,float-cast-overflow \
                -fopenmp -Wall -Wextra -Wno-unused-parameter
SAN_BINS := build/san/train_moe build/san/upcycle build/san/test_cpu build/san/test_gradcheck build/san/test_upcycle
build/san/train_moe: train_moe.cpp $(COMMON)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -o $@ $<
build/san/upcycle: upcycle.cu train_moe.cpp $(COMMON)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -x c++ -o $@ $<
build/san/test_cpu: test/test_cpu.cpp test/testing.h test/fixture.h train_moe.cpp $(COMMON)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -o $@ $<
build/san/test_gradcheck: test/test_gradcheck.cpp test/testing.h test/fixture.h train_moe.cpp $(COMMON)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -DTRAIN_MOE_DOUBLE -o $@ $<
build/san/test_upcycle: test/test_upcycle.cpp test/testing.h upcycle.cu train_moe.cpp $(COMMON)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -o $@ $<
san: $(SAN_BINS)
test-san: $(SAN_BINS)
	@test -f data/tiny/tokenizer.bin || $(MAKE) --no-print-directory data-tiny
	SUITES=san bash test/run_tests.sh

TEST_BINS := test/bin/test_cpu test/bin/test_gradcheck $(if $(wildcard test/test_upcycle.cpp),test/bin/test_upcycle) test/bin/test_bpe

# the emulated GPU binaries are built when the CUDA headers exist (no GPU needed)
NPROC := $(shell nproc 2>/dev/null || echo 2)
test: train_moe generate $(if $(wildcard upcycle.cu),upcycle) $(TEST_BINS)
	@test -f data/tiny/tokenizer.bin || $(MAKE) --no-print-directory data-tiny
	$(if $(HAVE_CUDA_HEADERS),$(MAKE) --no-print-directory -j$(NPROC) emu)
	EMU_DIR=$(EMU_DIR) bash test/run_tests.sh

fixtures:
	/usr/bin/python3 dev/reference/make_fixtures.py --out test/fixtures

clean:
	rm -rf train_moe train_moe_gpu upcycle generate generate_gpu test/bin build

bench-cpu:
	bash dev/bench/bench_cpu.sh

quickstart: train_moe upcycle
	bash scripts/quickstart.sh

# the reproductions write docs/results/<table>/[tiny/]; rerunning skips finished rows
REPRO_SCRIPTS := scripts/repro_drop_upcycling.py scripts/repro_expert_upcycling.py scripts/repro_routing.py \
                 scripts/repro_shared_experts.py
repro-tiny: train_moe upcycle
	@test -f data/tiny/tokenizer.bin || $(MAKE) --no-print-directory data-tiny
	@set -e; for s in $(REPRO_SCRIPTS); do $(PYTHON) $$s --preset tiny --trainer cpu; done

repro-small: train_moe upcycle train_moe_gpu
	@test -f data/full/tokenizer.bin || { echo "repro-small: data/full is missing: run make data (or make data-unpack on the GPU machine)"; exit 1; }
	@set -e; for s in $(REPRO_SCRIPTS); do $(PYTHON) $$s --preset small --trainer gpu; done

# the scaling-law grids (docs/REPRODUCTIONS.md): many short runs each; they say their wall time before starting
GRID_SCRIPTS := scripts/repro_upcycling_scaling.py scripts/repro_granularity.py
repro-grids-tiny: train_moe upcycle
	@test -f data/tiny/tokenizer.bin || $(MAKE) --no-print-directory data-tiny
	@set -e; for s in $(GRID_SCRIPTS); do $(PYTHON) $$s --preset tiny --trainer cpu --threads 1; done

repro-grids-small: train_moe upcycle train_moe_gpu
	@test -f data/full/tokenizer.bin || { echo "repro-grids-small: data/full is missing: run make data (or make data-unpack on the GPU machine)"; exit 1; }
	@set -e; for s in $(GRID_SCRIPTS); do $(PYTHON) $$s --preset small --trainer gpu; done

# GPU targets: need an NVIDIA GPU (the H100/H200 machine); see docs/gpu-log.md
test-gpu: train_moe train_moe_gpu cuda-check
	GPU=./train_moe_gpu FIXTURES=build/cuda-check/test_gpu_fixtures bash test/test_gpu.sh

bench: build/cuda-check/bench_gpu
	BENCH=build/cuda-check/bench_gpu bash dev/bench/bench.sh
