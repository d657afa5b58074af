from dsframe.config.schema import RecipeConfig, RunSpec, StageConfig, TrainerConfig, validate  # noqa: F401
from dsframe.config.structured import to_dataclass  # noqa: F401
