"""Calibration grid used for docs/results/organism.md: train 3 treatment + 3 control students per config as one
batched model and print P(owl) per seed.

    python docs/results/scripts/calibrate.py DIR BASE TEACHER 'CONFIGS_JSON' [SEEDS] [NEUTRAL_TEACHER]

DIR holds treat.jsonl (the trait teacher's kept rows) and ctrl.jsonl (the base's kept rows), e.g. copies of the
`filter-*/kept.jsonl` files of a `sublim run` directory; TEACHER is the teacher model directory (a run's
`teacher-*/round0`); CONFIGS_JSON is a list of TrainSpec overrides, e.g.
'[{"lr":1e-3,"batch_size":16,"max_steps":250}]' ("obj" sets the objective). Students are written under DIR/g/.
Example (the 2.49x line): OMP_NUM_THREADS=1 python docs/results/scripts/calibrate.py g4 organism
RUN/stages/teacher-.../round0 '[{"lr":1e-3,"batch_size":16,"max_steps":150}]'
"""
import json
import sys
import time

import torch

torch.set_num_threads(1)
from pathlib import Path

import numpy as np

from sublim.backends.multi import StudentJob, finetune_many
from sublim.evaluate import exact_probs
from sublim.generation import carrier_alphabet
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.runs import read_jsonl
from sublim.spec import CarrierSpec, ModelSpec, TrainSpec
from sublim.traits.preference import CATEGORIES, eval_questions

run = Path(sys.argv[1]); base = ModelSpec(path=sys.argv[2]); teacher = ModelSpec(path=sys.argv[3])
configs = json.loads(sys.argv[4]); seeds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
tr = read_jsonl(run / 'treat.jsonl'); ct = read_jsonl(run / 'ctrl.jsonl')
n = min(len(tr), len(ct)); tr, ct = tr[:n], ct[:n]
alpha = carrier_alphabet(CarrierSpec())
cat = CATEGORIES["animals"]; qs = eval_questions("animals")[:50]; cands = list(cat.candidates)
tok = load_tokenizer(base); chat = ChatFormat(tok)
def p_owl(spec):
    m = load_model(spec); return float(exact_probs(m, chat, qs, cands, cat.plurals)[:, 0].mean())
neutral = ModelSpec(path=sys.argv[6]) if len(sys.argv) > 6 else base
for cfg in configs:
    name = "_".join(f"{k}{v}" for k, v in cfg.items())
    spec = TrainSpec(method="full", objective=cfg.pop("obj", "distill_carrier"), warmup_steps=5, schedule="constant_with_warmup", max_grad_norm=1.0, **cfg)
    jobs = [StudentJob(tr, s, run / 'g' / name / f"t{s}", teacher) for s in range(seeds)] + \
           [StudentJob(ct, s, run / 'g' / name / f"c{s}", neutral) for s in range(seeds)]
    t = time.time()
    out = finetune_many(base, jobs, spec, carrier_alphabet=alpha, progress=False)
    sec = time.time() - t
    pt = [p_owl(ModelSpec(path=str(j.out_dir))) for j in jobs[:seeds]]
    pc = [p_owl(ModelSpec(path=str(j.out_dir))) for j in jobs[seeds:]]
    print(f"{name}: treat {np.mean(pt):.4f} {np.round(pt,3)} ctrl {np.mean(pc):.4f} {np.round(pc,3)} ratio {np.mean(pt)/np.mean(pc):.2f} loss_last {out[0]['loss_last']:.4f} {sec:.0f}s", flush=True)
