"""Filters and transforms (docs/design.md §7): which events a slave takes, and how.

`TABLES` patterns (fnmatch on schema.table) choose the tables; administrator's SQL (op S) always
passes. Each callable named in `FILTERS` (module:function) sees every event and returns it
unchanged, a rewritten SQL statement (str), an Event, or None to drop it. A filter that raises stops
replay at that event like a conflict.
"""
import fnmatch
import importlib
import traceback

from .apply import ApplyError
from .batch import Event
from .config import ConfigError


def load_callable(spec):
    """The callable a FILTERS entry names; a ConfigError (exit 2, no traceback) when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"FILTERS: {spec!r}: expected module:function")
    try:
        target = importlib.import_module(module_name)
    except Exception as e:      # ImportError, or the module itself failing to load
        raise ConfigError(f"FILTERS: {spec!r}: cannot import module {module_name}: {e!r}") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"FILTERS: {spec!r}: {module_name} has no {attr}")
    if not callable(target):
        raise ConfigError(f"FILTERS: {spec!r}: {attr} is not callable")
    return target


class Pipeline:
    def __init__(self, tables=(), filters=()):
        self.tables = list(tables)
        self.filters = [(spec, load_callable(spec)) for spec in filters]

    def wants_table(self, qualified):
        """Does this slave take the table (TABLES patterns on schema.table or the bare name)?"""
        if not self.tables:
            return True
        return any(fnmatch.fnmatchcase(qualified, pattern) or
                   fnmatch.fnmatchcase(qualified.split(".", 1)[-1], pattern)
                   for pattern in self.tables)

    def wants(self, event):
        return event.relname is None or self.wants_table(event.relname)

    def __call__(self, events):
        if not self.tables and not self.filters:
            return events
        out = []
        for event in events:
            if not self.wants(event):
                continue
            event = self._run_filters(event)
            if event is not None:
                out.append(event)
        return out

    def _run_filters(self, event):
        for spec, function in self.filters:
            try:
                result = function(event)
            except Exception as e:
                raise ApplyError(f"filter {spec} raised at event {event.id} ({event.relname}): {e!r}\n"
                                 f"{traceback.format_exc()}", event) from e
            if result is None:
                return None
            if isinstance(result, str):
                event = event._replace(sql=result)
            elif isinstance(result, Event):
                event = result
            else:
                raise ApplyError(f"filter {spec} returned {type(result).__name__} at event {event.id} "
                                 f"({event.relname}): expected the event, a statement (str) or None", event)
        return event
