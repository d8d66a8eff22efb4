"""The MNIST auxiliary-logit experiment: subliminal learning with no language, many models at once.

A teacher MLP ``d-W-W-(10+aux)`` is trained on the 10 class logits of real digits. A student that starts
from the teacher's *initial* weights is trained to match only the teacher's ``aux`` auxiliary logits on
uniform-noise images (it never sees a digit) and still learns to classify digits; a student from a
different initialisation does not. The arms, per model ``i`` of ``N``:

==================  ==========================================================================
reference           the untrained teacher initialisation (chance)
teacher             trained on the 10 class logits (cross-entropy on digits)
student_aux_same    from the teacher's init (or only its head / hidden layers: ``share``), KL on aux logits
student_all_same    same init, KL on all 10+aux logits
student_aux_cross   from the init of model ``perm[i]`` (a derangement: never its own), KL on aux logits
student_all_cross   the same with all logits
==================  ==========================================================================

The distillation loss is ``KL(softmax(teacher) || softmax(student))`` summed over the chosen logits and
averaged over the *samples* of a batch, separately per model (:func:`kl_per_sample`).

The N models of each arm are trained as one batched model: parameters are stacked along a leading model
dimension, layers are ``torch.baddbmm`` over it, and one Adam step updates all of them. The loss is the
*sum* over models of each model's own mean loss, so each model's gradient is exactly its own, and Adam
(elementwise, also its weight decay) on stacked tensors equals N separate Adams; :func:`train_separately`
is the plain one-model-at-a-time implementation the tests compare against. Model ``i``'s init, data order
and noise come from seed ``seed + i`` (independent streams), so results do not depend on N.

The theorem, measured: along the students' training we record, per model, the cosine between the
student's parameter displacement and its teacher's displacement from the teacher's init, and the
teacher's loss (class cross-entropy on held-out digits) evaluated at the student's parameters.

Modules: ``config`` (arms, MnistConfig), ``inits`` (seeds and initialisations), ``model`` (the batched MLP,
losses, evaluation), ``optim`` (stacked Adam), ``train`` (teachers and students, the theorem along training),
``separate`` (the one-model-at-a-time reference), ``summary`` (intervals, the accuracy table), ``cpu`` (thread
heuristics), ``report`` (figures, HTML, printed table), ``run`` (one run of every arm).
"""
from __future__ import annotations

from sublim.toy.mnist.config import ARM_LABELS, ARMS, N_CLASSES, STUDENT_ARMS, MnistConfig, Params
from sublim.toy.mnist.cpu import _cpu_times as _cpu_times  # the tests read /proc/stat through it
from sublim.toy.mnist.cpu import auto_threads, busy_cores
from sublim.toy.mnist.inits import derangement, init_mlp, layer_sizes, model_seed, stack, student_inits
from sublim.toy.mnist.model import BatchedMLP, evaluate, forward, kl_per_sample
from sublim.toy.mnist.optim import StackedAdam
from sublim.toy.mnist.report import print_table
from sublim.toy.mnist.run import run_mnist
from sublim.toy.mnist.separate import train_separately
from sublim.toy.mnist.summary import accuracy_table
from sublim.toy.mnist.train import _noise_batch as _noise_batch  # the floor benchmark times it
from sublim.toy.mnist.train import train_students, train_teacher

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "N_CLASSES",
    "STUDENT_ARMS",
    "BatchedMLP",
    "MnistConfig",
    "Params",
    "StackedAdam",
    "accuracy_table",
    "auto_threads",
    "busy_cores",
    "derangement",
    "evaluate",
    "forward",
    "init_mlp",
    "kl_per_sample",
    "layer_sizes",
    "model_seed",
    "print_table",
    "run_mnist",
    "stack",
    "student_inits",
    "train_separately",
    "train_students",
    "train_teacher",
]
