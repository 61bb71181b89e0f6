"""Qdrant filters as Qdrant Edge objects.

The service takes filters in Qdrant's JSON form (validated by qdrant-client's pydantic models in
`vectorstores.parse_filter`, so both stores accept exactly the same documents). Qdrant Edge takes
the same conditions as its own Python classes; this module maps one onto the other, one
function per kind of node. A condition Edge has no class for (SliceCondition) is refused by
field name, before any store call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any, cast

import numpy as np
import qdrant_edge as qe
from qdrant_client import models

from libs.common.errors import InvalidArgument


def edge_filter(f: models.Filter | None) -> qe.Filter | None:
    """The Edge form of a validated Qdrant filter (None stays None)."""
    return None if f is None else _filter(f)


def _filter(f: models.Filter) -> qe.Filter:
    min_should = None
    if f.min_should is not None:
        min_should = qe.MinShould([_condition(c) for c in f.min_should.conditions], f.min_should.min_count)
    return qe.Filter(
        must=_conditions(f.must), should=_conditions(f.should), must_not=_conditions(f.must_not), min_should=min_should
    )


def _conditions(value: Any) -> list[Any] | None:
    """A clause holds a list of conditions or, in Qdrant's JSON, a single one."""
    if value is None:
        return None
    return [_condition(c) for c in (value if isinstance(value, list) else [value])]


def _condition(c: Any) -> Any:
    if isinstance(c, models.Filter):
        return _filter(c)
    if isinstance(c, models.FieldCondition):
        return _field(c)
    if isinstance(c, models.IsEmptyCondition):
        return qe.IsEmptyCondition(c.is_empty.key)
    if isinstance(c, models.IsNullCondition):
        return qe.IsNullCondition(c.is_null.key)
    if isinstance(c, models.HasIdCondition):
        return qe.HasIdCondition({str(i) if not isinstance(i, int) else i for i in c.has_id})
    if isinstance(c, models.HasVectorCondition):
        return qe.HasVectorCondition(c.has_vector)
    if isinstance(c, models.NestedCondition):
        return qe.NestedCondition(c.nested.key, _filter(c.nested.filter))
    raise InvalidArgument(f"{type(c).__name__} is not supported by the embedded engine", field="filter")


def _field(c: models.FieldCondition) -> qe.FieldCondition:
    return qe.FieldCondition(
        c.key,
        match=_match(c.match) if c.match is not None else None,
        range=_range(c.range) if c.range is not None else None,
        geo_bounding_box=qe.GeoBoundingBox(_point(c.geo_bounding_box.top_left), _point(c.geo_bounding_box.bottom_right))
        if c.geo_bounding_box
        else None,
        geo_radius=qe.GeoRadius(_point(c.geo_radius.center), c.geo_radius.radius) if c.geo_radius else None,
        geo_polygon=_polygon(c.geo_polygon) if c.geo_polygon else None,
        values_count=qe.ValuesCount(
            lt=c.values_count.lt, gt=c.values_count.gt, lte=c.values_count.lte, gte=c.values_count.gte
        )
        if c.values_count
        else None,
        is_empty=c.is_empty,
        is_null=c.is_null,
    )


MATCHES: dict[type, Callable[[Any], Any]] = {
    models.MatchValue: lambda m: qe.MatchValue(_value(m.value)),
    models.MatchText: lambda m: qe.MatchText(m.text),
    models.MatchTextAny: lambda m: qe.MatchTextAny(m.text_any),
    models.MatchPhrase: lambda m: qe.MatchPhrase(m.phrase),
    models.MatchPrefix: lambda m: qe.MatchPrefix(m.prefix),
    models.MatchSubstring: lambda m: qe.MatchSubstring(m.substring),
    models.MatchAny: lambda m: qe.MatchAny(list(m.any)),
    models.MatchExcept: lambda m: qe.MatchExcept(list(m.except_)),
}


def _value(value: str | int | bool) -> str | int | bool:
    """The binding reads a Python bool as the integer 1 (bool subclasses int); numpy's bool reaches it as a bool."""
    return cast(bool, np.bool_(value)) if isinstance(value, bool) else value


def _match(m: Any) -> Any:
    return MATCHES[type(m)](m)


def _range(r: models.Range | models.DatetimeRange) -> Any:
    if isinstance(r, models.Range):
        return qe.RangeFloat(gte=r.gte, gt=r.gt, lte=r.lte, lt=r.lt)
    return qe.RangeDateTime(gte=_iso(r.gte), gt=_iso(r.gt), lte=_iso(r.lte), lt=_iso(r.lt))


def _iso(value: datetime | date | None) -> str | None:
    """RFC 3339 text; a date alone is midnight UTC, as Qdrant reads it."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        return f"{value.isoformat()}T00:00:00Z"
    return value.isoformat() if value.tzinfo else f"{value.isoformat()}Z"


def _point(p: models.GeoPoint) -> qe.GeoPoint:
    return qe.GeoPoint(lon=p.lon, lat=p.lat)


def _polygon(p: models.GeoPolygon) -> qe.GeoPolygon:
    interiors = [[_point(x) for x in ring.points] for ring in p.interiors] if p.interiors else None
    return qe.GeoPolygon([_point(x) for x in p.exterior.points], interiors)
