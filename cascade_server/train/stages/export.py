"""The export stage: the cascade bundle for the gateway (ONNX student + manifest with its
calibration) and the teacher's Triton model-repository entry (ONNX + the production
config.pbtxt). Serving artefacts only: training weights stay in the run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from ...bundle import TEXT_INPUTS, Bundle, Manifest, TeacherRef, TextPreprocess
from ..capture_data import load_info, versioned
from ..capture_data import summary as capture_summary
from ..methods import Ensemble, StagedOutputs
from ..records import RunDir
from ..teachers import OnnxTeacher, TorchTeacher
from ..to_onnx import export_onnx
from .anytime import plan_tiers, write_members
from .calibrate import calibrate, load_calibration
from .distill import Pair
from .prepare import Prepared


def teacher_config(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    max_batch_size: int = 64,
    input_name: str = "input",
    output_name: str = "logits",
    instances: int = 1,
    max_queue_delay_us: int = 100,
    default_timeout_us: int = 5_000_000,
    modality: str = "image",
    text_inputs: tuple[str, str] = ("input_ids", "attention_mask"),
):
    """The production Triton config: ONNX Runtime platform, dynamic batching, GPU instances.
    (The bundled CPU server derives a Python-backend twin from it; see cascade_server.triton.)"""
    from tritonclient.grpc import model_config_pb2 as mc

    if modality == "text":  # token ids and attention mask, int64, padded to max_length
        tensors = [(n, mc.TYPE_INT64, [in_shape[1]]) for n in text_inputs]
    else:
        tensors = [(input_name, mc.TYPE_FP32, list(in_shape))]
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=n, data_type=t, dims=d) for n, t, d in tensors],
        output=[mc.ModelOutput(name=output_name, data_type=mc.TYPE_FP32, dims=[num_classes])],
        instance_group=[
            mc.ModelInstanceGroup(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        ],
        # A short queue delay: the teacher hop is latency-sensitive, and requests still batch
        # under load (a 2 ms delay was measured to add ~2.6 ms to every lone request).
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=max_queue_delay_us,
            preferred_batch_size=[s for s in (8, 16, 32) if s <= max_batch_size],
            # The gateway sends its deadline as the request timeout; a request still queued
            # past it is rejected rather than computed for nobody. The default bounds requests
            # from clients that send none. REJECT is the enum's default (0): text_format leaves
            # it out of config.pbtxt and Triton reads the missing field as REJECT, so the
            # written file (and the committed one, which must equal it) has no timeout_action.
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=default_timeout_us,
                allow_timeout_override=True,
            ),
        ),
        # Triton runs this before reporting ready, so the first real request does not pay for
        # lazy initialisation (tens of ms measured on the first call without it).
        model_warmup=[
            mc.ModelWarmup(
                name="zeros",
                batch_size=1,
                inputs={
                    n: mc.ModelWarmup.Input(data_type=t, dims=d, zero_data=True)
                    for n, t, d in tensors
                },
            )
        ],
    )
    return config


def write_teacher_entry(
    repository: Path,
    name: str,
    teacher: TorchTeacher | OnnxTeacher,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    max_batch_size: int = 64,
    modality: str = "image",
    version: int = 1,
) -> TeacherRef:
    """`repository/name/`: config.pbtxt and `version`/model.onnx (a PyTorch teacher exported, an
    ONNX one copied with its own tensor names). Returns how the gateway calls it."""
    from ...triton import write_model_config

    entry = repository / name
    model_path = entry / str(version) / "model.onnx"
    text_inputs: tuple[str, str] = TEXT_INPUTS
    if isinstance(teacher, TorchTeacher):
        export_onnx(teacher.model, in_shape, model_path, modality=modality)
        input_name, output_name = "input", "logits"
    else:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(teacher.path, model_path)
        input_name, output_name = teacher.input_name, teacher.output_name
        if modality == "text":
            text_inputs = teacher.text_inputs() or TEXT_INPUTS
    config = teacher_config(
        name,
        in_shape,
        num_classes,
        input_name=input_name,
        output_name=output_name,
        max_batch_size=max_batch_size,
        modality=modality,
        text_inputs=text_inputs,
    )
    write_model_config(config, entry / "config.pbtxt")
    return TeacherRef(
        model_name=name,
        model_version=str(version),
        input_name=input_name,
        text_inputs=text_inputs,
        output_name=output_name,
        max_batch_size=max_batch_size,
    )


def export(
    prep: Prepared,
    run_dir: Path,
    *,
    bundles: Path,
    repository: Path,
    pair: Pair | None = None,
) -> Bundle:
    """The cascade bundle and the teacher's Triton entry, from the run directory (calibrated
    first if it is not yet) or from `pair` in memory. An anytime (B-DISTIL) student is served
    as stages (`export.anytime: tiers`, anytime.py) or as one graph with every stage an output
    (`graph`)."""
    cfg = prep.config
    run = RunDir(run_dir)
    pair = pair or Pair.load(prep, run_dir)
    if not (run / RunDir.CALIBRATION).is_file():
        calibrate(prep, run_dir, pair=pair)
    calibration, stages = load_calibration(run)
    meta = pair.student.meta
    model = pair.student.model
    # An anytime student served as stages: member 1 the student, the later members tiers.
    plan = None
    if isinstance(model, Ensemble) and stages and cfg.export.anytime == "tiers":
        plan = plan_tiers(prep, run, pair, model)
        calibration, stages = plan.calibration, []
    teacher_ref = write_teacher_entry(
        repository,
        cfg.export.teacher_name or f"{cfg.export.name}_teacher",
        pair.teacher,
        prep.in_shape,
        prep.num_classes,
        max_batch_size=cfg.export.max_batch_size,
        modality=prep.modality,
    )
    record = run.record()
    captured = load_info(run_dir)
    student_info = record.student.model_dump(exclude={"loss_history"}) if record.student else {}
    manifest = Manifest(
        name=cfg.export.name,
        version=versioned(  # distilled with capture: the capture's fingerprint too
            cfg.export.version
            or f"{cfg.export.name}-{cfg.method.name}-{prep.fingerprint[:8]}-s{cfg.seed}",
            captured,
        ),
        modality=prep.modality,
        classes=prep.classes,
        preprocess=prep.spec,
        output_classes=tuple(meta.output_classes) if meta.output_classes else None,
        abstain_output=meta.abstain_output,
        in_domain_classes=tuple(meta.in_domain_classes) if meta.in_domain_classes else None,
        stages=tuple(stages),
        default_threshold=calibration.threshold,
        calibration=calibration,
        teacher=teacher_ref,
        tiers=plan.tiers if plan is not None else (),
        frontier=plan.frontier if plan is not None else None,
        training={
            "method": cfg.method.name,
            "params": meta.method_params,
            "dataset": cfg.data.name,
            "data_fingerprint": prep.fingerprint,
            "seed": cfg.seed,
            "student": {"arch": meta.arch, **meta.kwargs, **student_info},
            "teacher": record.teacher.model_dump() if record.teacher else {},
            "test": record.evaluation or {},
            **({"capture": capture_summary(captured)} if captured else {}),
        },
    )
    bundle_dir = bundles / cfg.export.name
    if plan is not None:
        assert isinstance(model, Ensemble)
        write_members(model, prep, bundle_dir, manifest.student_file)
    elif isinstance(model, Ensemble) and stages:  # anytime: every stage is an output
        export_onnx(
            StagedOutputs(model),
            prep.in_shape,
            bundle_dir / manifest.student_file,
            modality=prep.modality,
            output_name=["logits", *[s.output for s in stages]],
        )
    else:
        export_onnx(
            model, prep.in_shape, bundle_dir / manifest.student_file, modality=prep.modality
        )
    if prep.tokenizer is not None and isinstance(prep.spec, TextPreprocess):
        prep.tokenizer.save(str(bundle_dir / prep.spec.tokenizer_file))
    bundle = Bundle(bundle_dir, manifest)
    bundle.save()
    return bundle
