"""One federated experiment from one explicit config: plan, run, report."""

from ftte_jax.experiment.config import DataConfig
from ftte_jax.experiment.config import ExperimentConfig
from ftte_jax.experiment.config import IMPORTANCE_SOURCES
from ftte_jax.experiment.config import PretrainConfig
from ftte_jax.experiment.config import reconstruction_choices
from ftte_jax.experiment.config import resolve
from ftte_jax.experiment.config import SearchConfig
from ftte_jax.experiment.config import validate
from ftte_jax.experiment.pretrain import check_checkpoint
from ftte_jax.experiment.report import params_sha256
from ftte_jax.experiment.run import build
from ftte_jax.experiment.run import Experiment
