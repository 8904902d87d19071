"""A worker builds and runs its models before its first job (`InferenceWorker.warm_up`)."""

from __future__ import annotations

import threading

import inference.model.predictor as predictor
from dicom_node.export_targets import ExportTargets
from dicom_node.settings import RoutingRule, WorkerSettings
from dicom_node.worker import InferenceWorker, ModelRegistry
from inference.model.package import ModelPackage


def _worker(node, registry: ModelRegistry, model: str) -> InferenceWorker:
    rules = [RoutingRule(name="mr", match={"Modality": "MR"}, model=model)]
    return InferenceWorker(
        "warm-test", "cpu", node.db, node.store, WorkerSettings(), registry, threading.Event(), ExportTargets([]), rules
    )


def test_a_worker_builds_and_runs_its_rules_model_before_its_first_job(unstarted_node, firing_model, monkeypatch):
    """The network the first job asks for is already built, and torch's first calls are paid:
    the warm-up ran the real network once on a batch of empty slices of the package's input size."""
    built: list[str] = []
    ran: list[tuple[int, ...]] = []
    real_build, real_predict = ModelPackage.build_model, predictor.predict_slices

    def build(self, device="cpu"):
        built.append(self.identity.display)
        return real_build(self, device)

    def predict(model, slices, **kwargs):
        ran.append(slices.shape)
        return real_predict(model, slices, **kwargs)

    monkeypatch.setattr(ModelPackage, "build_model", build)
    monkeypatch.setattr(predictor, "predict_slices", predict)
    registry = ModelRegistry()
    _worker(unstarted_node, registry, str(firing_model)).warm_up()
    assert len(built) == 1 and ran == [(WorkerSettings().batch_size, 64, 64)]
    registry.network(str(firing_model), "cpu")  # what the first job asks for
    assert len(built) == 1


def test_a_failed_warm_up_leaves_the_worker_running(unstarted_node, firing_model, monkeypatch):
    """A model that cannot be built at start-up is logged; the worker goes on to poll for jobs
    (one needing that model then fails with the reason, as before) instead of dying."""
    import dicom_node.worker

    tried, polling = threading.Event(), threading.Event()

    def broken(self, device="cpu"):
        tried.set()
        raise RuntimeError("CUDA out of memory (simulated)")

    def no_job(*args, **kwargs):
        polling.set()
        return None

    monkeypatch.setattr(ModelPackage, "build_model", broken)
    monkeypatch.setattr(dicom_node.worker, "claim_next_job", no_job)
    stop = threading.Event()
    worker = _worker(unstarted_node, ModelRegistry(), str(firing_model))
    worker.stop_event = stop
    worker.start()
    try:
        assert tried.wait(30), "run() did not warm up"
        assert polling.wait(30), "the worker did not go on to poll for jobs"
        assert worker.is_alive()
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()


def test_a_worker_without_rules_builds_nothing(unstarted_node, monkeypatch):
    """No rule, no job: the default package is not loaded or built for nothing."""
    built: list[str] = []  # recorded, not raised: warm_up logs and swallows a build's exception

    def build(self, device="cpu"):
        built.append(self.identity.display)
        raise RuntimeError("built a network no job can use")

    monkeypatch.setattr(ModelPackage, "build_model", build)
    worker = InferenceWorker(
        "warm-test", "cpu", unstarted_node.db, unstarted_node.store, WorkerSettings(), ModelRegistry(),
        threading.Event(), ExportTargets([]), [],
    )  # fmt: skip
    worker.warm_up()
    assert worker.models == [] and built == []
