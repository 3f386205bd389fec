"""Make torchvision importable in a CPU-only vLLM environment (`make test-vllm` runs this after installing vllm-cpu).

Why: vllm-cpu depends on torchvision and torchaudio, and the registry only has their CUDA builds. Their compiled
extensions need CUDA libraries, so `import torchvision` fails on a machine without CUDA, and vLLM's LLaVA module
imports torchvision (through its Pixtral module). torchvision's Python half works without its extension: this
script (1) deletes the compiled extension files, so torchvision takes its "no extension" path, and (2) guards the
two fake-operator registrations (`torchvision::nms`, `torchvision::qnms`) that its meta registrations module makes
unconditionally, which fail when the extension did not define those operators. torchaudio and torchcodec are
uninstalled by the Makefile (nothing here imports them). Run it again after any reinstall of torchvision; it is
idempotent and refuses a torchvision whose files it does not recognise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GUARDED = ("torchvision::nms", "torchvision::qnms")


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        sys.exit("scripts/vllm_cpu_torchvision.py: torchvision is not installed in this environment")
    root = Path(spec.origin).parent
    for extension in (*root.glob("_C*.so"), *root.glob("image*.so")):
        extension.unlink()
    meta = root / "_meta_registrations.py"
    text = meta.read_text()
    for op in GUARDED:
        plain = f'@torch.library.register_fake("{op}")'
        guarded = f'@(torch.library.register_fake("{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'
        if guarded in text:
            continue
        if plain not in text:
            sys.exit(f"scripts/vllm_cpu_torchvision.py: {meta} has no {plain}: a torchvision this script does not know")
        text = text.replace(plain, guarded)
    meta.write_text(text)
    print(f"torchvision at {root}: compiled extensions removed, {', '.join(GUARDED)} registrations guarded")


if __name__ == "__main__":
    main()
