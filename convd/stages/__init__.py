"""One module per stage; each takes an item and its context, returns the next stage."""

from convd.stages.cleanup import cleanup, quarantine
from convd.stages.convert import convert
from convd.stages.detect import detect
from convd.stages.publish import publish
from convd.stages.reserve import reserve
from convd.stages.unpack import unpack

__all__ = ["cleanup", "convert", "detect", "publish", "quarantine", "reserve", "unpack"]
