"""A wrapper that reads, sets and deletes every attribute but its own on the object it wraps.

catrt's accelerated pipeline and engine bundle stand in for a diffusers pipeline: `fast.scheduler = X` (diffusers'
way to swap a scheduler) must reach the pipeline the calls run, as `fast.scheduler` reads it from there; set on the
wrapper, reads showed it and calls never used it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ForwardsAttributes:
    """Forwards attribute reads, sets and deletes to the object in `self.<_target>`, except the names in
    `_own_attributes` and those of the class itself (methods, properties). Before the target is set (copy and
    pickle make the object without __init__) every attribute is the wrapper's, and reads find nothing to forward to.
    """

    _target: ClassVar[str]  # the instance attribute holding the wrapped object
    _own_attributes: ClassVar[frozenset[str]]  # the instance attributes the wrapper keeps for itself

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self._target not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[self._target], name)

    def _own(self, name: str) -> bool:
        """Whether attribute `name` is this wrapper's to set and delete (else the wrapped object's)."""
        return name in self._own_attributes or hasattr(type(self), name) or self._target not in self.__dict__

    def __setattr__(self, name: str, value: Any) -> None:
        if self._own(name):
            object.__setattr__(self, name, value)
        else:
            setattr(self.__dict__[self._target], name, value)

    def __delattr__(self, name: str) -> None:
        # As sets: `del fast.x` removes the `x` that `fast.x = ...` set on the wrapped object.
        if self._own(name):
            object.__delattr__(self, name)
        else:
            delattr(self.__dict__[self._target], name)
