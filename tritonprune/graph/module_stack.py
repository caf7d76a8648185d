"""The qualified names of a model's modules running right now, on this thread.

Kept by two global forward hooks (one registration each, not two per module) that act only on the thread
that made the stack: the tracer names each recorded op's module with it, and the what-if forward names
the module where a forward fails (a failing forward never reaches the post-hooks, so the path then ends
at the innermost failing module). A module outside the model (one built during the forward) stands
under its caller's name."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn


class ModuleStack:
    def __init__(self, names: dict[int, str]):
        """`names`: id(module) -> its qualified name in the model."""
        self.names = names
        self.path: list[str] = []
        self.thread = threading.get_ident()

    def innermost(self) -> str:
        return self.path[-1] if self.path else ""

    def enter(self, module: nn.Module, _args: object) -> None:
        if threading.get_ident() == self.thread:
            name = self.names.get(id(module))
            self.path.append(name if name is not None else self.innermost())

    def leave(self, module: nn.Module, _args: object, _out: object) -> None:
        if threading.get_ident() == self.thread and self.path:
            self.path.pop()

    @contextlib.contextmanager
    def hooked(self) -> Iterator[ModuleStack]:
        """The hooks are registered inside the block only."""
        pre = nn.modules.module.register_module_forward_pre_hook(self.enter)
        post = nn.modules.module.register_module_forward_hook(self.leave)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()
