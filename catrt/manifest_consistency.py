"""A manifest's fields against each other and against its graphs' shapes (`consistency_problems`).

Part of `catrt.integrity.check_integrity`, run on a manifest of the right shape: the build config against the
model, files and verification records, k = ceil(alpha * N), N and the patch size against the full graph's latent,
height / width / batch / text length against its inputs, the step graphs' activations against the build's
precision, the `alphas` table against the build's alphas and the pruned graphs, and every pruned graph's shapes
against the full graph's with its k rows. Each problem is a CorruptBundleError naming the field.
"""

from __future__ import annotations

import math

from catrt.build_config import BuildConfig, format_alphas
from catrt.contract import FULL, PRUNED, graph_kind, pruned_k
from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, CorruptBundleError, echo
from catrt.manifest import MANIFEST_FILE, Manifest
from catrt.pipeline_facts import rows_per_image, text_tokens_before


class _Problems:
    """Collects consistency problems; `expect` records one when its condition is false."""

    def __init__(self) -> None:
        self.items: list[CatrtError] = []

    def expect(self, condition: bool, field_name: str, message: str, value: object = None) -> bool:
        if not condition:
            self.items.append(CorruptBundleError(
                f"{MANIFEST_FILE} {message}; the manifest was edited or is damaged: rebuild the engine",
                field=field_name, value=value,
            ))
        return condition


def consistency_problems(manifest: Manifest, build: BuildConfig) -> list[CatrtError]:
    """Each way the build fields, k, N, the transformer config and the graphs' shapes disagree."""
    from catrt.engines import ENGINES

    check = _Problems()
    check.expect(manifest.model["name"] == build.model, "model.name",
                 f"model.name is {echo(manifest.model['name'], PATH_ECHO_LIMIT)} but build.model is {echo(build.model, PATH_ECHO_LIMIT)}", manifest.model["name"])
    total = sum(record["size"] for record in manifest.files.values())
    check.expect(manifest.total_size == total, "total_size",
                 f"total_size is {manifest.total_size} but its files add up to {total} bytes", manifest.total_size)
    verification = manifest.verification
    worst = max(verification["max_relative_error"].values())
    check.expect(verification["passed"] is True and worst <= verification["tolerance"], "verification",
                 f"verification did not pass (worst relative error {worst:.3g}, tolerance {verification['tolerance']:g}); "
                 f"only verified builds are published")
    engine = ENGINES.get(build.backend)
    if engine is not None:
        check.expect(build.precision in engine.precisions, "build.precision",
                     f"build.precision {build.precision} is not one the {build.backend} backend builds", build.precision)
    _graph_problems(manifest, build, check)
    _precision_problems(manifest, build, check)
    return check.items


#: The step graphs' tensors that hold model activations, so have the build's precision (indices and the
#: timestep are integers or the scheduler's; context tensors are the pipeline's and may differ).
_MODEL_DTYPE_TENSORS: frozenset[str] = frozenset({"hidden_states", "patches", "kv_cache", "tokens", "kv", "kv_rows"})


def _precision_problems(manifest: Manifest, build: BuildConfig, check: _Problems) -> None:
    """The step graphs' activations have the dtype of `build.precision`: a precision edited to another valid
    value would load the pipeline in a dtype the graphs were not built (or verified) for."""
    expected = str(build.dtype).removeprefix("torch.")
    for graph, spec in manifest.graphs.items():
        if graph_kind(graph) not in ("full", "pruned"):
            continue
        for side in ("inputs", "outputs"):
            for tensor in spec[side]:
                if tensor["name"] in _MODEL_DTYPE_TENSORS and not check.expect(
                    tensor["dtype"] == expected, "build.precision",
                    f"build.precision is {build.precision} ({expected}) but graphs.{graph}.{side}.{tensor['name']} "
                    f"is {tensor['dtype']}", build.precision,
                ):
                    return


def _graph_problems(manifest: Manifest, build: BuildConfig, check: _Problems) -> None:
    graphs = manifest.graphs
    pruned = [graph for graph in graphs if graph_kind(graph) == "pruned"]
    shapes = {
        (graph, side): {tensor["name"]: list(tensor["shape"]) for tensor in graphs[graph][side]}
        for graph in graphs for side in ("inputs", "outputs")
    }
    for graph, names in (("full", FULL.inputs), *((graph, PRUNED.inputs) for graph in pruned)):
        order = [tensor["name"] for tensor in graphs[graph]["inputs"]]
        if not check.expect(order[: len(names)] == list(names), f"graphs.{graph}.inputs",
                            f"graphs.{graph} inputs start {order[: len(names)]}, not {list(names)}"):
            return
    for graph, names in (("full", FULL.outputs), *((graph, PRUNED.outputs) for graph in pruned)):
        if not check.expect(set(names) <= set(shapes[graph, "outputs"]), f"graphs.{graph}.outputs",
                            f"graphs.{graph} outputs {sorted(shapes[graph, 'outputs'])} lack one of {list(names)}"):
            return

    config = manifest.model["transformer_config"]
    patch = config.get("patch_size")
    if not check.expect(isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1,
                        "model.transformer_config.patch_size",
                        f"model.transformer_config.patch_size must be a positive integer, got {echo(patch)}"):
        return
    latent = shapes["full", "inputs"]["hidden_states"]
    where = "graphs.full.inputs.hidden_states"
    if not check.expect(len(latent) in (3, 4), where,
                        f"graphs.full hidden_states has shape {latent}, not (rows, channels, height, width) or packed (rows, tokens, channels)"):
        return
    if len(latent) == 3:  # packed tokens (FLUX): each row of the latents is one token
        rows, tokens, channels = latent
        patch = 1
    else:
        rows, channels, height, width = latent
    in_channels = config.get("in_channels", channels)
    check.expect(channels == in_channels, where,
                 f"graphs.full hidden_states has {channels} channels, model.transformer_config.in_channels is {in_channels}")
    if len(latent) == 4:
        if not check.expect(height % patch == 0 and width % patch == 0, where,
                            f"graphs.full hidden_states latent {width}x{height} is not divisible by the patch size {patch}"):
            return
        tokens = (height // patch) * (width // patch)
        check.expect(manifest.num_tokens == tokens, "num_tokens",
                     f"num_tokens is {manifest.num_tokens} but the full graph's {width}x{height} latent in {patch}x{patch} "
                     f"patches has {tokens}", manifest.num_tokens)
    else:
        check.expect(manifest.num_tokens == tokens, "num_tokens",
                     f"num_tokens is {manifest.num_tokens} but the full graph takes {tokens} packed tokens", manifest.num_tokens)
    per_image = rows_per_image(manifest.model["pipeline_class"])
    any_guidance = check.expect(rows in (build.batch, 2 * build.batch), "build.batch",
                                f"build.batch is {build.batch} but the graphs take {rows} rows (batch, or 2 x batch with guidance)",
                                build.batch)
    if any_guidance and per_image is not None:
        # the pipeline's guidance fixes the rows: a batch edited to half or twice the built one is no other batch
        check.expect(rows == per_image * build.batch, "build.batch",
                     f"build.batch is {build.batch} but the graphs take {rows} rows ({manifest.model['pipeline_class']} "
                     f"runs {per_image} row(s) per image: {'classifier-free guidance' if per_image == 2 else 'distilled guidance'})",
                     build.batch)
    if len(latent) == 4:
        _size_problems(build, height, width, check)
    else:
        _packed_size_problems(build, tokens, check)
    if not _alpha_table_problems(manifest, build, tokens, pruned, check):
        return

    full_tokens = shapes["full", "outputs"]["tokens"]
    kv = shapes["full", "outputs"]["kv"]
    # (K/V slots, rows, N, width) for the full graph's cache; a pruned graph reads it whole and writes k rows.
    slots, width_kv = (kv[0], kv[3]) if len(kv) == 4 else ("slots", "width")
    token_width = full_tokens[2] if len(full_tokens) == 3 else "width"
    check.expect(shapes["full", "inputs"]["timestep"] == [rows], "graphs.full.inputs.timestep",
                 f"graphs.full.inputs.timestep has shape {shapes['full', 'inputs']['timestep']}, where the build's graphs give {[rows]}")
    check.expect(full_tokens == [rows, tokens, token_width], "graphs.full.outputs.tokens",
                 f"graphs.full.outputs.tokens has shape {full_tokens}, where the build's graphs give {[rows, tokens, token_width]}")
    check.expect(kv == [slots, rows, tokens, width_kv], "graphs.full.outputs.kv",
                 f"graphs.full.outputs.kv has shape {kv}, where the build's graphs give {[slots, rows, tokens, width_kv]}")
    for graph in pruned:
        # Every graph sees the same rows, N and context; a pruned graph is the full graph with its k rows.
        patches = shapes[graph, "inputs"]["patches"]
        if not check.expect(len(patches) == 3 and patches[0] == rows, f"graphs.{graph}.inputs.patches",
                            f"graphs.{graph} patches has shape {patches}, not ({rows}, k, channels x patch area)"):
            continue
        selected = patches[1]
        check.expect(patches[2] == channels * patch * patch, f"graphs.{graph}.inputs.patches",
                     f"graphs.{graph} patches hold {patches[2]} values per token, not {channels} channels x {patch}x{patch}")
        check.expect(selected == pruned_k(graph), f"graphs.{graph}",
                     f"graphs.{graph} computes {selected} tokens, not the k = {pruned_k(graph)} its name says", selected)
        expectations = [
            (f"graphs.{graph}.inputs.timestep", shapes[graph, "inputs"]["timestep"], [rows]),
            (f"graphs.{graph}.inputs.indices", shapes[graph, "inputs"]["indices"], [rows, selected]),
            (f"graphs.{graph}.inputs.kv_cache", shapes[graph, "inputs"]["kv_cache"], kv),
            (f"graphs.{graph}.outputs.tokens", shapes[graph, "outputs"]["tokens"], [rows, selected, token_width]),
            (f"graphs.{graph}.outputs.kv_rows", shapes[graph, "outputs"]["kv_rows"], [slots, rows, selected, width_kv]),
        ]
        for where, found, expected in expectations:
            check.expect(found == expected, where, f"{where} has shape {found}, where the build's graphs give {expected}")
    _context_problems(manifest, build, shapes, rows, pruned, check)


def _alpha_table_problems(manifest: Manifest, build: BuildConfig, tokens: int, pruned: list[str], check: _Problems) -> bool:
    """The `alphas` table lists the build's alphas in order, each with its k, its own pruned graph and that
    graph's verification error, and every pruned graph is one of them; False when the graphs cannot be trusted."""
    listed = [entry["alpha"] for entry in manifest.alphas]
    ok = check.expect(listed == list(build.alphas), "alphas",
                      f"alphas lists {format_alphas(tuple(listed))} but build.alphas is {format_alphas(build.alphas)}", listed)
    errors = manifest.verification["max_relative_error"]
    for index, entry in enumerate(manifest.alphas):
        where = f"alphas[{index}]"
        alpha, k, graph = entry["alpha"], entry["k"], entry["graph"]
        try:
            expected_k = build.num_selected(tokens, alpha)
        except ConfigError:
            expected_k = None  # an alpha the build does not list: reported above
        ok &= check.expect(k == expected_k or expected_k is None, f"{where}.k",
                           f"{where}.k is {k} but alpha {alpha:g} selects ceil(alpha x {tokens}) = {expected_k} tokens", k)
        ok &= check.expect(graph in pruned and pruned_k(graph) == k, f"{where}.graph",
                           f"{where}.graph is {echo(graph)}, not the bundle's pruned graph of k = {k} (pruned-k{k})", graph)
        graph_errors = [error for name, error in errors.items() if name.split(".")[0] == graph]
        check.expect(bool(graph_errors) and entry["max_relative_error"] == max(graph_errors), f"{where}.max_relative_error",
                     f"{where}.max_relative_error is {echo(entry['max_relative_error'])}, not its graph's verification error "
                     f"({max(graph_errors) if graph_errors else 'none recorded'})", entry["max_relative_error"])
    unlisted = sorted(set(pruned) - {entry["graph"] for entry in manifest.alphas})
    ok &= check.expect(not unlisted, "alphas",
                       f"graphs {unlisted} are pruned graphs of no alpha in the alphas table", unlisted)
    return ok


def _size_problems(build: BuildConfig, height: int, width: int, check: _Problems) -> None:
    """height and width are the latent's times one scale (the VAE's; 1 for a pixel-space model)."""
    height_fits = check.expect(build.height % height == 0, "build.height",
                               f"build.height {build.height} is not a multiple of the full graph's latent height {height}",
                               build.height)
    width_fits = check.expect(build.width % width == 0, "build.width",
                              f"build.width {build.width} is not a multiple of the full graph's latent width {width}",
                              build.width)
    if height_fits and width_fits:
        check.expect(build.height // height == build.width // width, "build.height",
                     f"build size {build.width}x{build.height} (WxH) is not the full graph's {width}x{height} latent "
                     f"at one scale ({build.width // width} across, {build.height // height} down)",
                     {"width": build.width, "height": build.height})


def _packed_size_problems(build: BuildConfig, tokens: int, check: _Problems) -> None:
    """The build's size is a grid of the packed tokens at one scale (pixels per token a side)."""
    scale = math.isqrt(build.height * build.width // max(tokens, 1))
    check.expect(scale > 0 and build.height % scale == 0 and build.width % scale == 0
                 and (build.height // scale) * (build.width // scale) == tokens, "build.height",
                 f"build size {build.width}x{build.height} (WxH) is not a grid of the full graph's {tokens} packed tokens",
                 {"width": build.width, "height": build.height})


def _context_problems(
    manifest: Manifest, build: BuildConfig, shapes: dict[tuple[str, str], dict[str, list[int]]], rows: int,
    pruned: list[str], check: _Problems,
) -> None:
    """The context tensors are the same in every graph, made by (or fed to) the context graph; text length fits."""
    context = {**shapes["context", "inputs"], **shapes["context", "outputs"]}
    full_context = {name: shape for name, shape in shapes["full", "inputs"].items() if name not in FULL.inputs}
    for graph in pruned:
        pruned_context = {name: shape for name, shape in shapes[graph, "inputs"].items() if name not in PRUNED.inputs}
        check.expect(pruned_context == full_context, f"graphs.{graph}.inputs",
                     f"graphs.{graph} context inputs {pruned_context} are not the full graph's {full_context}")
    for name, shape in full_context.items():
        check.expect(context.get(name) == shape, f"graphs.context.{name}",
                     f"graphs.full input {name} {shape} is not the context graph's ({context.get(name)})")
    text = shapes["context", "inputs"].get("encoder_hidden_states")
    if text is None or not check.expect(len(text) == 3 and text[0] == rows, "graphs.context.inputs.encoder_hidden_states",
                                        f"graphs.context encoder_hidden_states has shape {text}, not ({rows}, text length, width)"):
        return
    length = build.max_sequence_length
    if length is None:
        return
    before = text_tokens_before(manifest.model["pipeline_class"])
    if before is None:
        check.expect(text[1] >= length, "build.max_sequence_length",
                     f"build.max_sequence_length is {length} but the graphs take {text[1]} text tokens", length)
    else:
        check.expect(text[1] == before + length, "build.max_sequence_length",
                     f"build.max_sequence_length is {length} but the graphs take {text[1]} text tokens "
                     f"({manifest.model['pipeline_class']}: {before} + max_sequence_length)", length)
