# One-command set-up and runs. Every install goes through constraints.txt (the tested set).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUN ?= runs/tiny
RECIPE ?= tiny

.PHONY: install demo test smoke compile clean

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[pipelines,registry,serve,mnist,test]'
	bash .ci/install-services.sh

# The embedded default end to end (dvc.yaml): prepare-demo trains the digits teacher, then cache-latents ->
# teacher-rollouts -> distill -> diagnose -> evaluate -> register: a registered 4-step student and
# runs/demo/evaluate/report.html.
demo: install
	$(PYTHON) -m dvc repro

test: install
	$(PYTHON) -m pytest -q

# A quick check that every stage runs: the tiny random teacher (tiny://sd15, untrained) through cache-latents ->
# teacher-rollouts -> distill -> sample. Its $(RUN)/sample.png is a 16x16 patch of noise, as an untrained teacher's is.
smoke: install
	ddil cache-latents --config $(RECIPE) --out $(RUN)/latents
	ddil teacher-rollouts --config $(RECIPE) --latents $(RUN)/latents --out $(RUN)/rollouts
	ddil distill --config $(RECIPE) --latents $(RUN)/latents --rollouts $(RUN)/rollouts --out $(RUN)/distill
	ddil sample --model $(RUN)/distill/student --prompt "a handwritten digit seven" --scheduler student --out $(RUN)/sample.png

# Regenerate the compiled Kubeflow pipeline (checked in; a test fails when it is stale).
# DDIL_IMAGE=REGISTRY/ddil:TAG make compile builds it for another image.
compile:
	$(PYTHON) -m pipelines.ddil

clean:
	rm -rf runs .pytest_cache
