"""ckpteval's Hydra plugins (discovered by Hydra under the `hydra_plugins` namespace package).

Hydra imports every module here on start; the sweeper is selected in conf/config.yaml."""
