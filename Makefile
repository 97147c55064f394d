# make demo: the whole pipeline on synthetic CT (CPU, a few minutes). make test: the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# A small UNet and a 32-slice window so that 60 epochs fit in a few minutes on 2 CPU cores; the validation cases
# held out, so that the Dice printed is on cases the network never saw.
demo: $(VENV)/.installed
	$(PY) preprocess.py data/raw data/prep --synthetic 12 --seed 0
	$(PY) train.py --data data/prep --output output --epochs 60 --device cpu --lr 3e-3 \
		--widths 8 16 32 64 --strides 2 2 2 --num-res-units 1 --crop 32 96 96 --val-every 5 \
		--no-train-on-val --overwrite
	$(PY) infer.py data/raw/synth_001.nii.gz --checkpoint output/model.pt --out output --overwrite  # a validation case
	@awk -F, 'NR > 1 && $$3 != "" && $$3 + 0 > best { best = $$3; epoch = $$1 } \
		END { printf "demo: best validation Dice %.3f (epoch %d), see output/dice.png\n", best, epoch }' \
		output/metrics.csv

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf data output/* $(VENV)
	touch output/.gitkeep
