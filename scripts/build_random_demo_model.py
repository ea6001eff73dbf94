"""Build a random-weight stand-in for the embedded demo model (SD 1.5 family + an LCM-LoRA-format adapter).

It loads through exactly the same from_pretrained + load_lora_weights path as a hub model. The shipped demo
model is trained instead (`python -m lcm_live.demo_model train`); this one is for development and tests.

    python scripts/build_random_demo_model.py OUT_FOLDER
"""

import sys

from lcm_live.architectures import save_model_with_lora


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "random-demo-model"
    print(save_model_with_lora("tiny-sd15", out, seed=0, lora_style="peft"))
