# Corpus targets (dev/data/README.md). Included by the top-level Makefile; paths are
# relative to the repository root, so run make from there.
#   make data         full build  -> data/full/  (en, code, de; vocab 16384; ~2 min on 2 cores)
#   make data-tiny    tiny build  -> data/tiny/  (300 KB per domain; vocab 2048; seconds)
#   make data-pack    data/full/ -> data/pack/corpus-full.tar.xz (to carry to a GPU machine)
#   make data-unpack  data/pack/corpus-full.tar.xz -> data/full/
#   make test-data    tiny build if missing, then dev/data/test_data.py data/tiny
PYTHON ?= python3
DATA_PACK ?= data/pack/corpus-full.tar.xz

.PHONY: data data-tiny data-pack data-unpack test-data

data:
	PYTHONHASHSEED=0 $(PYTHON) dev/data/build_corpus.py

data-tiny:
	PYTHONHASHSEED=0 $(PYTHON) dev/data/build_corpus.py --tiny

data-pack:
	@test -f data/full/tokenizer.bin || { echo "data/full/tokenizer.bin missing: run 'make data' first" >&2; exit 1; }
	mkdir -p $(dir $(DATA_PACK))
	cd data/full && ls tokenizer.json tokenizer.bin summary.json *_train_*.bin *_val_*.bin | LC_ALL=C sort | \
	  tar --create --no-recursion --mtime=@0 --owner=0 --group=0 --numeric-owner --files-from=- | \
	  xz -9 -T2 > $(CURDIR)/$(DATA_PACK).tmp
	mv $(DATA_PACK).tmp $(DATA_PACK)
	@ls -l $(DATA_PACK) | awk '{printf "%s: %.1f MB\n", $$9, $$5/1e6}'

data-unpack:
	@test -f $(DATA_PACK) || { echo "$(DATA_PACK) missing: run 'make data-pack' on the build machine and copy it here" >&2; exit 1; }
	mkdir -p data/full && tar -xJf $(DATA_PACK) -C data/full
	@ls data/full

test-data:
	@test -f data/tiny/tokenizer.bin || $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) data-tiny
	PYTHONHASHSEED=0 $(PYTHON) dev/data/test_data.py data/tiny
