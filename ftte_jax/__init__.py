"""ftte_jax: a JAX-functional simulator of FTTE (semi-asynchronous,
memory-budgeted federated learning on heterogeneous edge devices).

The public names are re-exported here; ``docs/design.md`` describes them.
"""

from ftte_jax.core import algorithms
from ftte_jax.core import client
from ftte_jax.core import losses
from ftte_jax.core import transforms
from ftte_jax.core.algorithms import EngineConfig
from ftte_jax.core.algorithms import preset
from ftte_jax.core.client import ClientResult
from ftte_jax.core.client import DeviceState
from ftte_jax.core.client import LocalData
from ftte_jax.core.client import PerDevice
from ftte_jax.core.engine import make_environment
from ftte_jax.core.engine import make_simulator
from ftte_jax.core.engine import Simulator
from ftte_jax.core.extensions import Extensions
from ftte_jax.core.fleet import Fleet
from ftte_jax.core.fleet import FleetConfig
from ftte_jax.core.fleet import make_fleet
from ftte_jax.core.masks import MaskPlan
from ftte_jax.core.masks import make_plan
from ftte_jax.core.state import Counters
from ftte_jax.core.state import Environment
from ftte_jax.core.state import SimState
from ftte_jax.core.state import Start
from ftte_jax.data.client_data import ClientData
from ftte_jax.data.datasets import load_federated
from ftte_jax.experiment import build
from ftte_jax.experiment import DataConfig
from ftte_jax.experiment import Experiment
from ftte_jax.experiment import ExperimentConfig
from ftte_jax.experiment import params_sha256
from ftte_jax.experiment import SearchConfig
from ftte_jax.models import get_model
from ftte_jax.search.plan import build_plan

__all__ = [
    "ClientData", "ClientResult", "Counters", "DataConfig", "DeviceState",
    "EngineConfig", "Environment", "Experiment", "ExperimentConfig",
    "Extensions", "Fleet", "FleetConfig", "LocalData", "MaskPlan",
    "PerDevice", "SearchConfig", "SimState", "Simulator", "Start",
    "algorithms", "build", "build_plan", "client", "get_model",
    "load_federated", "losses", "make_environment", "make_fleet",
    "make_plan", "make_simulator", "params_sha256", "preset", "transforms",
]
