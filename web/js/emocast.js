// EmoCAST: emotion presets on "EmoCAST Emotion Encode". Picking a preset fills the text box, which
// stays editable; the preset picker itself is not saved in workflows nor sent to the server.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const PRESETS = {
  "horror movie": "The portrait is watching a horror movie with jump scares.",
  "happy news": "The portrait just heard wonderful news and is beaming with happiness.",
  "sad farewell": "The portrait is saying a sad farewell to an old friend, close to tears.",
  "angry argument": "The portrait is furious, shouting in a heated argument.",
  "surprised": "The portrait is astonished by a completely unexpected surprise.",
  "disgusted": "The portrait smells something rotten and is disgusted.",
  "calm narration": "The portrait is calmly and warmly telling a bedtime story.",
  "nervous interview": "The portrait is nervous and anxious during an important job interview.",
  "proud speech": "The portrait is giving a proud, confident victory speech.",
  "neutral": "The portrait is speaking with a neutral expression.",
};
const CHOOSE = "(choose a preset)";

app.registerExtension({
  name: "EmoCAST.EmotionPresets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "EmoCASTEmotionEncode") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const text = this.widgets?.find((w) => w.name === "text");
      if (!text) return result;
      const preset = this.addWidget(
        "combo",
        "preset",
        CHOOSE,
        (value) => {
          if (!(value in PRESETS)) return;
          text.value = PRESETS[value];
          text.callback?.(text.value);
          preset.value = CHOOSE;
          this.setDirtyCanvas(true, true);
        },
        { values: [CHOOSE, ...Object.keys(PRESETS)], serialize: false },
      );
      preset.serialize = false;
      preset.tooltip = "Fill the emotion text with a ready-made prompt (you can edit it afterwards).";
      return result;
    };
  },
});
