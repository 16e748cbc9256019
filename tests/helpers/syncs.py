"""Recording the ops that read a device value on the host (a host sync on a GPU), and where they ran."""
import os

import torch

# ops that read a device value on the host, i.e. wait for the GPU (on a CPU they are recorded, not waited for)
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "unique", "_unique2", "unique_dim",
               "unique_consecutive", "masked_select", "equal"}


# torch's own package folder, not any path with a "torch" folder in it: on the GPU image every package lives
# under /opt/torch/.venv, and transformers' frames were skipped as torch's, blaming their reads on our caller
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class RecordSyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records "<op> in <file>:<line>" for every syncing op, at the innermost frame outside torch that ran it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            import traceback

            caller = next(f for f in reversed(traceback.extract_stack()[:-1])  # [:-1]: not this method
                          if not f.filename.startswith(TORCH_DIR))
            self.seen.append(f"{func.overloadpacket.__name__} in {caller.filename}:{caller.lineno}")
        return func(*args, **(kwargs or {}))
