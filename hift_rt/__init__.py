"""hift_rt: hierarchical full-parameter fine-tuning (HiFT) as a CUDA-aware memory runtime.

    opt = hift_rt.wrap(model, optim="adamw", lr=1e-5)

returns a torch.optim.Optimizer that updates one depth-group of the model per step, keeps the
other groups' optimizer state in pinned host memory, and streams it in and out behind compute.
`hift_rt.compile(model)` compiles each unit's module on its own (torch.compile per block), which
HiFT's changing requires_grad does not recompile (not in __all__: a star import would shadow the
builtin compile).
Nothing here touches CUDA at import time.
"""
from .config import HiFTConfig
from .loss import efficient_lm_loss
from .api import wrap
from .optimizer import HiFTOptimizer
from .regional import compile

__version__ = "0.1.0"
__all__ = ["wrap", "HiFTOptimizer", "HiFTConfig", "efficient_lm_loss", "__version__"]
