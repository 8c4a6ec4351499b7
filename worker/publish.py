"""The Redis writes of a worker's own keys, as pipeline steps (``llm_router.protocol`` spells
the keys): the lease, the catalog, the instances, the devices and the events saying so.

One place for them so the worker agent and the scale simulator (``scripts/sim``) speak
exactly the same protocol: a simulated host is a real worker as far as Redis and the
routers can tell.
"""

from __future__ import annotations

from typing import Iterable

from llm_lab_router.protocol import (
    CatalogEntry,
    DeviceSnapshot,
    Event,
    Instance,
    Keys,
    WorkerInfo,
    WorkerVersion,
    to_hash,
    to_json,
)


def lease_ops(pipe, keys: Keys, info: WorkerInfo, ttl: float) -> None:
    """Renew the lease (``HSET`` + ``PEXPIRE``; the first result says whether it was new) and
    the worker's place in the index of workers (``SADD``: routers find it there without a SCAN,
    and another worker that removed it cannot keep it out for longer than a heartbeat)."""
    key = keys.worker(info.id)
    pipe.hset(key, mapping=to_hash(info))
    pipe.pexpire(key, int(ttl * 1000))
    pipe.sadd(keys.workers(), info.id)


def version_ops(pipe, keys: Keys, wid: str, version: WorkerVersion) -> str:
    """Bump the worker's version (``llm:w:{wid}:version``; part of every transaction that changes
    its catalog or instances); return the new version, for the events of the same transaction."""
    new = version.next()
    pipe.set(keys.version(wid), new)
    return new


def instance_ops(pipe, keys: Keys, wid: str, inst: Instance, version: str = "") -> None:
    """Write one instance and announce it with the whole record (routers apply it as carried)."""
    pipe.hset(keys.instance(inst.model, wid), mapping=to_hash(inst))
    pipe.publish(keys.events(wid), to_json(Event(kind="instance", worker=wid, instance=inst, version=version)))


def change_ops(pipe, keys: Keys, wid: str, inst: Instance, version: WorkerVersion) -> None:
    """One instance change, for a transaction: the record, the worker's version, the event."""
    instance_ops(pipe, keys, wid, inst, version_ops(pipe, keys, wid, version))


def publish_all_ops(pipe, keys: Keys, info: WorkerInfo, ttl: float, catalog: Iterable[CatalogEntry],
                    instances: Iterable[Instance], version: WorkerVersion, withdrawn: Iterable[str] = ()) -> None:
    """Everything a worker owns, for a transaction: lease, catalog, every instance (those of
    ``withdrawn`` models deleted), a new version and the worker and catalog events (after
    which routers re-read the worker: the instance events carry no version)."""
    wid = info.id
    lease_ops(pipe, keys, info, ttl)
    version_ops(pipe, keys, wid, version)
    key = keys.catalog(wid)
    pipe.delete(key)
    for model_id in withdrawn:
        pipe.delete(keys.instance(model_id, wid))
    if entries := {e.id: to_json(e) for e in catalog}:
        pipe.hset(key, mapping=entries)
    for inst in instances:
        instance_ops(pipe, keys, wid, inst)
    pipe.publish(keys.events(wid), to_json(Event(kind="worker", worker=wid)))
    pipe.publish(keys.events(wid), to_json(Event(kind="catalog", worker=wid)))


def goodbye_ops(pipe, keys: Keys, wid: str, instances: Iterable[Instance], version: WorkerVersion) -> None:
    """Last words: every instance as it is now, no lease, no devices, an event saying so."""
    version_ops(pipe, keys, wid, version)
    for inst in instances:
        instance_ops(pipe, keys, wid, inst)
    pipe.delete(keys.worker(wid), keys.devices(wid))
    pipe.publish(keys.events(wid), to_json(Event(kind="worker", worker=wid, alive=False)))


def devices_ops(pipe, keys: Keys, snap: DeviceSnapshot, interval: float) -> None:
    """The device snapshot, kept three intervals (a worker that stops publishing loses it)."""
    pipe.set(keys.devices(snap.worker), to_json(snap), px=int(3 * interval * 1000))
