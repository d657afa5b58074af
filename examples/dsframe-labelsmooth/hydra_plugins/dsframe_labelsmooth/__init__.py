# Hydra imports every module under the hydra_plugins namespace at start-up: this one adds the
# package's conf/ to the config search path, so conf/plugins/labelsmooth.yaml joins dsframe's
# plugins group (`plugins.labelsmooth.epsilon=0.2`, `+plugins=labelsmooth`).
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LabelSmoothSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="dsframe-labelsmooth", path="pkg://dsframe_labelsmooth.conf")
