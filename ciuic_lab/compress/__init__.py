"""Compression core: packing, CompressedLinear, methods, policies and the block walk.

`ciuic_lab.compress` is also the API verb, `ciuic_lab.compress(model, tokenizer, overrides)`:
the subpackage and the function share a name, so the module itself is made callable (importing a
submodule would otherwise shadow the function on the package).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ciuic_lab.api import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
