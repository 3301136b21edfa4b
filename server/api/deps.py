"""Shared route dependencies, as `Annotated` aliases (one place to change how routes get them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .catalog import Catalog
from .limits import Limits
from .metrics import Metrics
from .settings import ServerSettings


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_limits(request: Request) -> Limits:
    return request.app.state.limits


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
