"""The error types that mean 'bad input' (a clear one-line message, exit code 2), gathered for the CLI."""
from ddil_core.config import ConfigError
from ddil_core.config.limits import LimitExceeded
from ddil_core.data.datasets import DatasetError
from ddil_core.data.locks import OutputLockedError
from ddil_core.data.shards import ShardError
from ddil_core.models.pipeline_io import ModelError
from ddil_core.registry import RegistryError
from ddil_core.stages.outputs import OutputError
from ddil_core.training.checkpoint import CheckpointError
from ddil_core.stages.register import MetricsError

BAD_INPUT_ERRORS = (ConfigError, DatasetError, ShardError, ModelError, CheckpointError, MetricsError, OutputLockedError,
                    OutputError, RegistryError, LimitExceeded, FileNotFoundError)
