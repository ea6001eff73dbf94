"""What the terminal shows: lcm-live's own lines (the URL, what serves, one line per load stage) and, unless
--verbose, nothing from the libraries below it but their errors.

Targeted, not global: named loggers of the libraries lose their warnings, their progress bars go (the page shows
load progress), and one deprecation notice that huggingface_hub raises for diffusers' own call is not shown.
--verbose leaves all of it as the libraries set it, and load failures log their full traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings


LOG = "lcm_live"
QUIET_LOGGERS = (
    "transformers.utils.import_utils",  # "`CLIPImageProcessor` requires torchvision ...": we use no processor
    "transformers.modeling_utils",
    "transformers.distributed.tensor_parallel",  # "The following layers were not sharded": nothing is sharded here
    "diffusers.loaders.lora_base",  # "No LoRA keys associated to CLIPTextModel ...": LCM-LoRAs have none
    "diffusers.loaders.lora_pipeline",
    "diffusers.loaders.peft",
    "diffusers.models.modeling_utils",
    "diffusers.pipelines.pipeline_utils",
    "huggingface_hub.utils._http",  # "Retrying in 1s [Retry 1/5]" without network; the failure itself is logged
    "huggingface_hub.hf_api",
)


def setup(verbose: bool = False) -> None:
    """Call before the first import of diffusers or transformers (their import-time warnings come then)."""
    log = logging.getLogger(LOG)
    if not any(getattr(h, "lcm_live", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lcm-live: %(message)s"))
        handler.lcm_live = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated",
                            category=UserWarning, module="huggingface_hub")  # fmt: skip
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
