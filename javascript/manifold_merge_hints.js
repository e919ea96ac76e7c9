// Manifold Merge: hover hints for the A1111 / Forge / reForge tab. The WebUI loads every javascript/*.js of
// an extension as a classic script (the ComfyUI front end lives in javascript/comfyui/, which it does not load).
(function () {
    const hints = {
        manifold_merge_models: "The checkpoints to merge, in order: the order matters for EMA/WMA, SLERP (A, B) and add difference (A, B, C).",
        manifold_merge_method: "The merge method. Only its own settings are shown below.",
        manifold_merge_base: "Task-vector mode: the models' differences from this base are merged and the base added back.",
        manifold_merge_blocks: "Block weights: a comma list in the usual order (BASE, IN00-IN11, M00, OUT00-OUT11 for SD1.x), or named entries like BASE:0, IN*:0.2, OUT*:0.8. Karcher/WMA: one line per model.",
        manifold_merge_overrides: "Per-key values on top of the blocks, one PATTERN=VALUE per line, e.g. attn2=0.3.",
        manifold_merge_vae: "Bake this VAE into the merged checkpoint.",
        manifold_merge_discard: "Leave out the weights whose key matches this regular expression.",
        manifold_merge_overwrite: "Replace an existing file of that name (Save asks you to press it again).",
        manifold_merge_save: "Merge into NAME.safetensors in the checkpoint folder (empty name: an automatic one).",
        manifold_merge_load: "Merge in memory and load the result into the WebUI, without writing a file.",
    };
    function apply() {
        const root = typeof gradioApp === "function" ? gradioApp() : document;
        for (const [id, text] of Object.entries(hints)) {
            const element = root.querySelector("#" + id);
            if (element && !element.title) {
                element.title = text;
            }
        }
    }
    if (typeof onUiLoaded === "function") {
        onUiLoaded(apply);
    } else {
        document.addEventListener("DOMContentLoaded", apply);
    }
})();
