// segany annotator: the browser side of data-engine stages 1 (assisted-manual) and 2 (semi-automatic).
//
// The server computes one image embedding per image; every click/box is decoded here with the ONNX
// prompt decoder in onnxruntime-web (vendored under /static/vendor/ort by scripts/build_web.sh), so a
// click gives a mask without a network round trip. The decoder comes as two graphs
// (segany.export.onnx_split): decoder_image.onnx runs once when the embedding arrives and caches the
// image-only part, decoder_click.onnx runs per click and returns low-res (4g x 4g) logits, of which only
// the shown mask is resized to the image here (only over the box where it can be positive). Without ONNX
// support the server decodes instead. A phrase in the text box asks the server for masks of that thing
// (models with a class head or CLIP text token); they are reviewed like stage-2 pre-fills.
// Masks are H*W Uint8Arrays in row-major order; the API speaks COCO RLE (column-major).

const $ = (id) => document.getElementById(id);
const COLORS = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]];

const S = {
  maskImage: null,
  token: null, project: null, model: null, images: [], idx: 0,
  img: null, W: 0, H: 0, emb: null, embShape: null, ort: null, session: null, mode: "prompt",
  points: [], box: null, drag: null, candidates: [], chosen: 0, mask: null, lowres: null,
  history: [], future: [], saved: [], pending: [], selected: null, selectedPending: null, brush: 8, t0: null,
  decodeMs: [], timings: {}, embTensor: null, imgSession: null, imageSide: null, ortReady: null, zeroMask: null, maskCanvas: null, spm: [], busy: false, overlay: null, imageToken: 0,
  axes: null, proposalSeq: 0, textPrompt: null, me: null,
  // loadedToken: the navigation counter (imageToken) of the image whose picture, embedding and lists are all in;
  // clicks and edits wait for it. loadFailed: the counter of a load that failed (R / Retry opens it again).
  loadedToken: 0, loadFailed: null,
  // editSeq counts edits of the unsaved mask (click, box, brush stroke, choice, undo/redo, clear, save): a decode
  // or save answer is applied only if no edit came after its request. saves: the saves in flight; saveKey: the
  // uuid of the mask as it is now (a repeated save of the same mask sends it again: the server never duplicates).
  editSeq: 0, saves: [], saveKey: null, reviewing: new Set(),
  decoding: 0, // decodes in flight: until the last answers, the shown mask is not the prompts' mask
  // The view: `zoom` screen (CSS) pixels per image pixel and the image origin's place in #stage; `fit` follows the
  // stage's size (each image opens fitted). viewRect: the part of the stage the canvas covers (the visible image).
  view: { zoom: 1, x: 0, y: 0, fit: true }, viewRect: null, pan: null, spaceDown: false, hover: null,
  // Editing a saved annotation (E, its row's ✎, or a double-click on its row): `editing` names it and the revision
  // the edit started from; editBase: the mask before the current clicks (runs, see maskRuns), which the clicks'
  // object is added to, or cut out of (editCut: the first click was a background click).
  editing: null, editBase: null, editCut: false,
  historyMaxBytes: 64 * 1024 * 1024, // undo steps are dropped, oldest first, past this much memory
  maskShown: null, maskDrawn: null, maskDirty: null, // what S.maskCanvas shows (see renderMask)
};
window.segany = S; // for debugging and the browser tests

// ------------------------------------------------------------------------------------------ API
// FastAPI's 422 detail is a list of {loc, msg}: shown as "text: String should have at most 200 characters", not
// as the raw JSON.
function validationText(detail) {
  if (!Array.isArray(detail)) return JSON.stringify(detail);
  return detail.map((d) => {
    const where = (d.loc || []).filter((x) => x !== "body").join(".");
    return where ? `${where}: ${d.msg}` : String(d.msg);
  }).join("; ");
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {}, { Authorization: `Bearer ${S.token}` });
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(opts.json); }
  let res;
  try { res = await fetch(path, Object.assign({}, opts, { headers })); }
  catch (e) { // fetch's own "Failed to fetch" names neither the cause nor what to do
    throw new Error("the server did not answer (network down, or the server stopped): check it runs, then retry");
  }
  if (res.status === 401) {
    showLogin("token rejected: sign in again");
    const err = new Error("unauthorized: sign in again, then retry (your unsaved mask is kept)"); err.status = 401; throw err;
  }
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail; } catch (e) { /* not JSON */ }
    const err = new Error(`${res.status}: ${typeof detail === "string" ? detail : validationText(detail)}`);
    err.status = res.status; throw err;
  }
  return res;
}

// A save (POST with the mask's uuid), an edit (PATCH with its edit_uuid) or an accept/reject (POST with its
// edit_uuid, see reviewKey) is safe to send again: the server stores it once and answers a repeat with what it
// stored. So a network failure or a 5xx (the answer may have been lost after the server applied it) is sent again a
// few times, with growing pauses; a 4xx says what to fix, at once, and 507 (the server's disk is full) is not
// helped by retrying. Returns the answer's JSON; throws the last error.
const SAVE_TRIES = 4;
async function sendSave(path, opts) {
  for (let attempt = 0; ; attempt++) {
    try { return await (await api(path, opts)).json(); }
    catch (e) {
      if (attempt === SAVE_TRIES - 1 || (e.status !== undefined && (e.status < 500 || e.status === 507))) throw e;
      await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
    }
  }
}

function uuid4() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ------------------------------------------------------------------------------------------ RLE
function maskToRle(mask, H, W) { // column-major uncompressed COCO RLE
  const counts = []; let prev = 0, run = 0;
  for (let x = 0; x < W; x++) for (let y = 0; y < H; y++) {
    const v = mask[y * W + x];
    if (v !== prev) { counts.push(run); run = 0; prev = v; }
    run++;
  }
  counts.push(run);
  return { size: [H, W], counts };
}

function countsFromString(s) { // pycocotools' compressed counts string → run lengths
  const cnts = []; let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k); more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (cnts.length > 2) x += cnts[cnts.length - 2];
    cnts.push(x);
  }
  return cnts;
}

function rleToMask(rle) {
  const [H, W] = rle.size;
  const counts = typeof rle.counts === "string" ? countsFromString(rle.counts) : rle.counts;
  const m = new Uint8Array(H * W); let pos = 0, v = 0;
  let x0 = W, y0 = H, x1 = -1, y1 = -1; // the box of its pixels (m.box, as upscaleMask gives)
  for (const c of counts) {
    if (v && c > 0) {
      for (let i = pos; i < pos + c; i++) { const x = (i / H) | 0, y = i - x * H; m[y * W + x] = 1; }
      const xa = (pos / H) | 0, xb = ((pos + c - 1) / H) | 0;
      x0 = Math.min(x0, xa); x1 = Math.max(x1, xb);
      if (xa === xb) { y0 = Math.min(y0, pos - xa * H); y1 = Math.max(y1, pos + c - 1 - xa * H); }
      else { y0 = 0; y1 = H - 1; } // the run goes over a column's end
    }
    pos += c; v ^= 1;
  }
  m.box = x1 < 0 ? [0, 0, 0, 0] : [x0, y0, x1, y1];
  return m;
}

// ------------------------------------------------------------------------------------- decoding
async function initOrt() {
  try {
    const ort = await import("/static/vendor/ort/ort.wasm.min.mjs");
    ort.env.wasm.wasmPaths = "/static/vendor/ort/";
    // Threads need cross-origin isolation (the server sends COOP/COEP); otherwise one thread.
    // Half the cores (max 4): the page itself and the OS need the rest; ?threads=N overrides.
    const want = Number(new URLSearchParams(location.search).get("threads")) || Math.floor((navigator.hardwareConcurrency || 2) / 2);
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(4, want)) : 1;
    const [imgBuf, clickBuf] = await Promise.all(["decoder_image", "decoder_click"].map(
      async (name) => (await api(`/api/model/${name}.onnx`)).arrayBuffer()));
    const opts = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    S.imgSession = await ort.InferenceSession.create(imgBuf, opts);
    S.session = await ort.InferenceSession.create(clickBuf, opts);
    S.ort = ort;
    $("decoder-mode").textContent = `browser (onnxruntime-web, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? "s" : ""})`;
  } catch (e) {
    console.warn("in-browser decoder unavailable, using the server", e);
    S.session = null;
    $("decoder-mode").textContent = "server";
  }
}

// The image-only part of the decoder, once per embedding (its outputs stay as onnxruntime tensors).
async function prepareImageSide() {
  if (S.imageSide || !S.imgSession || !S.emb) return;
  const emb = S.emb; const t0 = performance.now();
  if (!S.embTensor) S.embTensor = new S.ort.Tensor("float32", S.emb, S.embShape);
  const out = await S.imgSession.run({ image_embeddings: S.embTensor });
  if (emb !== S.emb) return; // another image meanwhile
  S.imageSide = out; // fed to the click graph by name (segany.export.onnx_split: IMAGE_OUTPUTS)
  S.timings.imageSide = performance.now() - t0;
  await warmUp();
}

// The click graph's inputs: prompts in the model frame (points_xy, labels), previous low-res logits or null.
function clickFeeds(pts, labels, lowres) {
  const { ort } = S; const lowSide = 4 * S.embShape[2];
  if (!S.zeroMask || S.zeroMask.length !== lowSide * lowSide) S.zeroMask = new Float32Array(lowSide * lowSide);
  const feeds = {
    point_coords: new ort.Tensor("float32", Float32Array.from(pts.flat()), [1, pts.length, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, labels.length]),
    mask_input: new ort.Tensor("float32", lowres || S.zeroMask, [1, 1, lowSide, lowSide]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([lowres ? 1 : 0]), [1]),
  };
  for (const name of S.session.inputNames) if (!(name in feeds)) feeds[name] = S.imageSide[name];
  return feeds;
}

// onnxruntime's first runs of a session allocate and pre-pack (~10x a normal run): pay that once, before the
// user's first click, with throw-away prompts of both shapes a click produces (no mask yet, and with one).
async function warmUp() {
  if (S.warm || !S.session || !S.imageSide) return;
  S.warm = true; const t0 = performance.now();
  await S.session.run(clickFeeds([[0, 0], [0, 0]], [1, -1], null));
  await S.session.run(clickFeeds([[0, 0], [1, 1], [0, 0]], [1, 0, -1], S.zeroMask));
  S.timings.warmUp = performance.now() - t0;
}

// Image pixel (x, y) → the model's input frame. Each axis by its own rounded side, as
// ResizeLongestSide.apply_coords (and the embedding's resize) does: one factor for both was up to half a model
// pixel off on the short side, so the browser's masks differed from the server's.
function modelFrame(x, y) {
  const s = S.model.img_size; const scale = s / Math.max(S.W, S.H);
  return [x * Math.floor(S.W * scale + 0.5) / S.W, y * Math.floor(S.H * scale + 0.5) / S.H];
}
S.modelFrame = modelFrame; // for the browser tests

// The clicks' labels as the decoder gets them. An edit's cut (its first click a background click) decodes the
// object to cut out: that click is the object's, so every label is flipped.
function promptLabels() { return S.points.map((p) => (S.editCut ? 1 - p.label : p.label)); }

async function decodeInBrowser() {
  await prepareImageSide();
  const pts = S.points.map((p) => modelFrame(p.x, p.y)); const labels = promptLabels();
  if (S.box) { pts.push(modelFrame(S.box[0], S.box[1]), modelFrame(S.box[2], S.box[3])); labels.push(2, 3); }
  else { pts.push([0, 0]); labels.push(-1); }
  const lowSide = 4 * S.embShape[2];
  // From the second click on, SAM refines from the chosen candidate's logits (decodeOnServer: the same rule).
  const feeds = clickFeeds(pts, labels, S.lowres instanceof Float32Array && S.points.length > 1 ? S.lowres : null);
  const t0 = performance.now();
  const out = await S.session.run(feeds);
  S.timings.run = performance.now() - t0;
  const low = out.low_res_masks.data; const ls = lowSide * lowSide;
  // Low-res logits only; a candidate is resized and thresholded when shown (see maskOf).
  return [0, 1, 2].map((k) => ({ mask: null, score: out.iou_predictions.data[k], lowres: low.slice(k * ls, (k + 1) * ls) }));
}

// Low-res logits (L x L over the padded square model frame) → H x W mask, exactly as the server and the
// exporter make it: bilinear to the s x s model frame, crop the padding, bilinear to the image size (both
// align_corners=false). Each resize is linear and separable, so per axis the two compose into at most three
// consecutive low-res taps (L <= s) whose weights are computed once per image size. One pass over the
// pixels then gives the two-pass result without the s x s intermediate. Weights are non-negative, so a
// pixel can only be on where one of its taps is above the threshold: pixels outside the box of such cells
// are left at 0 without being computed (same result).
function upscaleAxes(L) {
  const s = S.model.img_size; const W = S.W, H = S.H;
  if (S.axes && S.axes.key === `${L}:${W}:${H}:${s}`) return S.axes;
  const scale = s / Math.max(W, H); const hin = Math.floor(H * scale + 0.5), win = Math.floor(W * scale + 0.5);
  // one bilinear resize of `inN` samples to `n` (torch's rule): the two source indices and the second's weight
  const src = (x, n, inN) => {
    const f = Math.max((x + 0.5) * inN / n - 0.5, 0); const a = Math.floor(f);
    return [a, Math.min(a + 1, inN - 1), f - a];
  };
  const axis = (n, inN) => {
    const base = new Int32Array(n), hi = new Int32Array(n), w = new Float32Array(3 * n);
    for (let x = 0; x < n; x++) {
      const [j0, j1, a] = src(x, n, inN); // image pixel ← model-frame pixels j0, j1 (the crop keeps indices)
      const [k0] = src(j0, s, L); base[x] = k0;
      for (const [j, wj] of [[j0, 1 - a], [j1, a]]) {
        const [ka, kb, b] = src(j, s, L); // model-frame pixel ← low-res cells ka, kb
        w[3 * x + ka - k0] += wj * (1 - b); w[3 * x + kb - k0] += wj * b;
      }
      hi[x] = Math.min(k0 + 2, L - 1);
    }
    return { base, hi, w };
  };
  S.axes = { key: `${L}:${W}:${H}:${s}`, x: axis(W, win), y: axis(H, hin) };
  return S.axes;
}

// First and last output index whose taps [base, hi] meet [lo, up] (both tables are non-decreasing).
function coveredRange(ax, lo, up) {
  let a = 0, b = ax.base.length - 1;
  while (a <= b && ax.hi[a] < lo) a++;
  while (b >= a && ax.base[b] > up) b--;
  return [a, b];
}

function upscaleMask(low) {
  const L = Math.round(Math.sqrt(low.length)); const W = S.W, H = S.H;
  const th = S.model.mask_threshold || 0; const m = new Uint8Array(W * H);
  const { x: ax, y: ay } = upscaleAxes(L);
  // box of low-res cells above the threshold, within the cells the image reads
  const rows = ay.hi[H - 1] + 1, cols = ax.hi[W - 1] + 1;
  let r0 = L, r1 = -1, c0 = L, c1 = -1;
  for (let r = 0; r < rows; r++) {
    const o = r * L; let any = false;
    for (let c = 0; c < cols; c++) if (low[o + c] > th) { any = true; if (c < c0) c0 = c; if (c > c1) c1 = c; }
    if (any) { if (r < r0) r0 = r; r1 = r; }
  }
  if (r1 < 0) { m.box = [0, 0, 0, 0]; return m; }
  const [xa, xb] = coveredRange(ax, c0, c1); const [ya, yb] = coveredRange(ay, r0, r1);
  m.box = [xa, ya, xb, yb]; // pixels outside are 0 (draw() only rewrites this box)
  const { base: bx, w: wx } = ax; const row = new Float32Array(L + 2); // +2: taps past L-1 have weight 0
  const ca = bx[xa], cb = Math.min(bx[xb] + 2, L - 1);
  for (let y = ya; y <= yb; y++) {
    // the three low-res rows mixed once for this image row, then three taps per pixel
    const r = ay.base[y], w0 = ay.w[3 * y], w1 = ay.w[3 * y + 1], w2 = ay.w[3 * y + 2];
    const q0 = r * L, q1 = Math.min(r + 1, L - 1) * L, q2 = Math.min(r + 2, L - 1) * L;
    for (let c = ca; c <= cb; c++) row[c] = w0 * low[q0 + c] + w1 * low[q1 + c] + w2 * low[q2 + c];
    const o = y * W;
    for (let x = xa; x <= xb; x++) {
      const c = bx[x]; const v = wx[3 * x] * row[c] + wx[3 * x + 1] * row[c + 1] + wx[3 * x + 2] * row[c + 2];
      m[o + x] = v > th ? 1 : 0;
    }
  }
  return m;
}

function copyMask(m) { const c = m.slice(); c.box = m.box && m.box.slice(); return c; } // the brush edits the shown mask

// A candidate's full-size mask is made when it is shown (from its low-res logits, or the server's RLE) and kept
// only while its decode's candidates are the shown ones (setCandidates): the undo history holds the candidates
// of every click, and 3 full masks each would be most of its memory.
function maskOf(c) {
  if (!c.mask) {
    const t0 = performance.now();
    c.mask = c.lowres instanceof Float32Array ? upscaleMask(c.lowres) : rleToMask(c.rle);
    S.timings.upscale = performance.now() - t0;
  }
  return c.mask;
}

function setCandidates(cands) {
  if (cands === S.candidates) return;
  for (const c of S.candidates) if (c.lowres instanceof Float32Array || c.rle) c.mask = null;
  S.candidates = cands;
}

// Server decoding refines from the chosen candidate exactly as decodeInBrowser does, but its logits stay on the
// server: a candidate's `lowres` is a reference { ref, index }, where ref = { imageId, body, prev, decode_id } is
// the request that made it (prev: the reference it refined from), so it can be made again.
async function decodeOnServer() {
  const body = { points: S.points.map((p) => [p.x, p.y]), labels: promptLabels(), box: S.box };
  const prev = S.lowres && S.lowres.ref && S.points.length > 1 ? S.lowres : null;
  const ref = { imageId: current().id, body, prev, decode_id: null };
  const res = await serverDecode(ref);
  return res.masks.map((rle, k) => ({ mask: null, rle, score: res.scores[k], lowres: { ref, index: k } }));
}

// POST one decode naming its previous one. The server keeps only its last few decodes: a previous it no longer
// has (410) is decoded again first, from its own request (recursively), so the mask is the one an unbroken
// session gives.
async function serverDecode(ref) {
  const send = () => api(`/api/images/${ref.imageId}/decode`, { method: "POST", json: Object.assign({}, ref.body,
    ref.prev ? { previous: { decode_id: ref.prev.ref.decode_id, index: ref.prev.index } } : {}) });
  let res;
  try { res = await send(); } catch (e) {
    if (e.status !== 410 || !ref.prev) throw e;
    await serverDecode(ref.prev.ref); // gives ref.prev.ref a fresh decode_id
    res = await send();
  }
  const out = await res.json(); ref.decode_id = out.decode_id;
  return out;
}

async function decode() {
  if (!S.points.length && !S.box) { setCandidates([]); if (!S.editing) setMask(null); draw(); return; }
  const token = S.imageToken; const seq = S.editSeq; const t0 = performance.now(); S.timings = {};
  let cands;
  S.decoding++;
  try { cands = S.session && S.emb ? await decodeInBrowser() : await decodeOnServer(); }
  catch (err) {
    // The prompt that asked for this mask is taken back: left drawn, it was saved in the prompts of a mask it
    // had no part in.
    if (!stale(token) && seq === S.editSeq && S.history.length) applyState(S.history.pop());
    throw err;
  } finally { S.decoding--; }
  if (stale(token)) return; // the user moved to another image meanwhile
  // A later edit (another click, Esc, undo, a save) owns the mask now: this answer is for a state that is gone.
  if (seq !== S.editSeq) { S.staleDrops = (S.staleDrops || 0) + 1; return; }
  setCandidates(cands);
  // With one point the three masks are genuine alternatives; keep the user's choice, else the best score.
  let best = 0; cands.forEach((c, k) => { if (c.score > cands[best].score) best = k; });
  S.chosen = S.points.length + (S.box ? 1 : 0) > 1 ? S.chosen : best;
  setMask(shownMask(cands[S.chosen])); S.lowres = cands[S.chosen].lowres;
  trimHistory();
  const t1 = performance.now(); draw(); S.timings.draw = performance.now() - t1;
  const ms = performance.now() - t0; S.timings.total = ms;
  S.decodeMs.push(ms); $("latency").textContent = ms.toFixed(1);
  renderChoices();
  if (S.waited && S.decoding === 0) { S.waited = false; setStatus("the mask is ready: press Enter to save it", true); }
}

// ------------------------------------------------------------------------------------- drawing
function colorFor(i) { return COLORS[i % COLORS.length]; }
// Pending masks take the colours after the saved ones, so each is told apart on the image and in its row.
function pendingColor(i) { return colorFor(S.saved.length + i); }

function rebuildOverlay() {
  const c = S.overlay || (S.overlay = document.createElement("canvas"));
  c.width = S.W; c.height = S.H;
  const ctx = c.getContext("2d"); const im = ctx.createImageData(S.W, S.H); const d = im.data;
  const paint = (m, rgb, a) => { for (let i = 0; i < m.length; i++) if (m[i]) { const o = 4 * i; d[o] = rgb[0]; d[o + 1] = rgb[1]; d[o + 2] = rgb[2]; d[o + 3] = a; } };
  // The annotation being edited is the blue mask meanwhile (its saved version is shown again if the edit is stale).
  const hidden = S.editing && !S.editing.stale ? S.editing.id : null;
  S.saved.forEach((a, i) => { if (a.id !== hidden) paint(a._mask, colorFor(i), a.id === S.selected ? 170 : 110); });
  S.pending.forEach((a, i) => paint(a._mask, pendingColor(i), a.id === S.selectedPending ? 170 : 90));
  ctx.putImageData(im, 0, 0);
}

// Brings S.maskCanvas (the shown mask as RGBA, at image size) up to S.mask, rewriting only what may have changed:
// for a new mask, its box (m.box: its pixels lie inside; none: anywhere) and what was drawn before; for the same
// mask edited in place (the brush) or rebuilt from it (undo), the rectangle the edit marked (S.maskDirty).
function renderMask() {
  const m = S.mask; const W = S.W, H = S.H;
  const mc = S.maskCanvas || (S.maskCanvas = document.createElement("canvas"));
  if (mc.width !== W || mc.height !== H) {
    mc.width = W; mc.height = H; S.maskImage = null; S.maskShown = null; S.maskDrawn = null; S.maskDirty = null;
  }
  const mctx = mc.getContext("2d");
  if (!S.maskImage) S.maskImage = mctx.createImageData(W, H);
  let rect = S.maskDirty;
  if (m !== S.maskShown) { rect = unionBox(rect, unionBox(S.maskDrawn, extent(m))); S.maskDrawn = extent(m); }
  else if (rect) S.maskDrawn = unionBox(S.maskDrawn, rect);
  S.maskShown = m; S.maskDirty = null;
  if (!rect) return;
  const x0 = Math.max(0, rect[0]), y0 = Math.max(0, rect[1]), x1 = Math.min(W - 1, rect[2]), y1 = Math.min(H - 1, rect[3]);
  if (x1 < x0 || y1 < y0) return;
  // No getImageData readback (slow): the mask as RGBA words, composited by drawImage.
  const px = new Uint32Array(S.maskImage.data.buffer);
  const on = 0x99ff901e; // ABGR little-endian: rgba(30, 144, 255, 0.6)
  for (let y = y0; y <= y1; y++) for (let i = y * W + x0, e = y * W + x1; i <= e; i++) px[i] = m && m[i] ? on : 0;
  mctx.putImageData(S.maskImage, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
}
function markDirty(rect) { S.maskDirty = unionBox(S.maskDirty, rect); }

// The canvas covers the visible part of the image and is as many device pixels as it shows, so prompts are drawn
// sharp at any zoom; the image, saved masks and the current mask are drawn through the view's transform, with
// nearest-neighbour sampling once an image pixel is two screen pixels or more (its pixels are seen as they are).
function draw() {
  const cv = $("view"); const ctx = cv.getContext("2d"); const vr = S.viewRect;
  if (!S.img || !vr) return;
  const v = S.view; const ox = v.x - vr.left, oy = v.y - vr.top; // image origin in canvas CSS pixels
  ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.setTransform(v.zoom * vr.kx, 0, 0, v.zoom * vr.ky, ox * vr.kx, oy * vr.ky);
  ctx.imageSmoothingEnabled = v.zoom < 2;
  ctx.drawImage(S.img, 0, 0);
  if (S.overlay) ctx.drawImage(S.overlay, 0, 0);
  if (S.mask) { renderMask(); ctx.drawImage(S.maskCanvas, 0, 0); }
  ctx.setTransform(vr.kx, 0, 0, vr.ky, 0, 0); // prompts in CSS pixels of the canvas
  const sx = (x) => ox + x * v.zoom, sy = (y) => oy + y * v.zoom;
  for (const p of S.points) {
    ctx.beginPath(); ctx.arc(sx(p.x), sy(p.y), 5, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? "#22c55e" : "#ef4444"; ctx.fill(); ctx.lineWidth = 1.5; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
  const b = S.drag && S.drag.moved ? S.drag.box : S.box;
  if (b) { ctx.lineWidth = 2; ctx.strokeStyle = "#facc15"; ctx.strokeRect(sx(b[0]), sy(b[1]), (b[2] - b[0]) * v.zoom, (b[3] - b[1]) * v.zoom); }
  if (S.mode === "brush" && S.hover) { // the brush's reach, at the pointer
    ctx.beginPath(); ctx.arc(sx(S.hover.x), sy(S.hover.y), Math.max(1, S.brush * v.zoom), 0, 2 * Math.PI);
    ctx.lineWidth = 1; ctx.strokeStyle = "#fff"; ctx.stroke(); ctx.setLineDash([3, 3]); ctx.strokeStyle = "#000"; ctx.stroke(); ctx.setLineDash([]);
  }
}

// Pointer moves (brush strokes, box drags, panning) redraw once per frame, however many events come.
function scheduleDraw() {
  if (S.drawQueued) return;
  S.drawQueued = true; requestAnimationFrame(() => { S.drawQueued = false; draw(); });
}

// ------------------------------------------------------------------------------------------ view
// Zoom (wheel, + and -, the stage's buttons) keeps the image point under the pointer (or the stage's centre)
// where it is; pan by dragging with the middle button or with Space held; 0 or Fit fits the image again. A small
// image is fitted too, so a 40x30 picture fills the stage in crisp pixels rather than a 40x30 speck.
function stageSize() { const st = $("stage"); return [st.clientWidth, st.clientHeight]; }
function fitZoom() { const [w, h] = stageSize(); return Math.max(1e-3, Math.min(w / S.W, h / S.H)); }
function zoomLimits() { const f = fitZoom(); return [Math.min(f, 1) / 2, Math.max(32, 8 * f)]; }

function fitView() {
  if (!S.W) return;
  const [w, h] = stageSize(); const z = fitZoom();
  S.view = { zoom: z, x: (w - S.W * z) / 2, y: (h - S.H * z) / 2, fit: true };
  layoutView();
}

function zoomAt(factor, sx, sy) { // (sx, sy): the stage point that stays put, in CSS pixels
  if (!S.W) return;
  const v = S.view; const [lo, hi] = zoomLimits(); const z = Math.min(hi, Math.max(lo, v.zoom * factor));
  S.view = { zoom: z, x: sx - (sx - v.x) * z / v.zoom, y: sy - (sy - v.y) * z / v.zoom, fit: false };
  clampPan(); layoutView(); draw();
}
function zoomKey(factor) { const [w, h] = stageSize(); zoomAt(factor, w / 2, h / 2); }

function panBy(dx, dy) { S.view.x += dx; S.view.y += dy; S.view.fit = false; clampPan(); layoutView(); scheduleDraw(); }

// Some of the image always stays in view (a fling of the pan cannot lose it).
function clampPan() {
  const [w, h] = stageSize(); const v = S.view; const iw = S.W * v.zoom, ih = S.H * v.zoom;
  const kx = Math.min(64, iw), ky = Math.min(64, ih);
  v.x = Math.min(w - kx, Math.max(kx - iw, v.x)); v.y = Math.min(h - ky, Math.max(ky - ih, v.y));
}

// Places and sizes the canvas over the visible part of the image (fitted: the whole image, centred).
function layoutView() {
  const [w, h] = stageSize(); const v = S.view; const cv = $("view");
  const left = Math.max(0, v.x), top = Math.max(0, v.y);
  const cw = Math.max(1, Math.min(w, v.x + S.W * v.zoom) - left), ch = Math.max(1, Math.min(h, v.y + S.H * v.zoom) - top);
  const dpr = window.devicePixelRatio || 1;
  const bw = Math.max(1, Math.round(cw * dpr)), bh = Math.max(1, Math.round(ch * dpr));
  Object.assign(cv.style, { left: `${left}px`, top: `${top}px`, width: `${cw}px`, height: `${ch}px` });
  if (cv.width !== bw) cv.width = bw;
  if (cv.height !== bh) cv.height = bh;
  S.viewRect = { left, top, width: cw, height: ch, kx: bw / cw, ky: bh / ch };
  $("zoom-level").textContent = `${Math.round(v.zoom * 100)}%`;
}

// Stage coordinates (CSS pixels) of a pointer event, and the image point under it (continuous: pixel (i, j)
// spans [i, i + 1) x [j, j + 1)).
function stagePoint(ev) {
  const st = $("stage"); const r = st.getBoundingClientRect();
  return [ev.clientX - r.left - st.clientLeft, ev.clientY - r.top - st.clientTop];
}
function toImage(ev) {
  const [sx, sy] = stagePoint(ev); const v = S.view;
  return { x: (sx - v.x) / v.zoom, y: (sy - v.y) / v.zoom };
}

function renderChoices() {
  const el = $("choices"); el.innerHTML = "";
  S.candidates.forEach((c, k) => {
    const btn = document.createElement("button");
    btn.textContent = `${k + 1}: ${c.score.toFixed(2)}`; btn.className = k === S.chosen ? "chosen" : "";
    btn.dataset.choice = String(k); btn.onclick = () => choose(k); el.appendChild(btn);
  });
}

function renderLists() {
  const ul = $("annotations"); ul.innerHTML = "";
  S.saved.forEach((a, i) => {
    const li = document.createElement("li"); li.dataset.id = a.id; li.className = a.id === S.selected ? "selected" : "";
    if (S.editing && S.editing.id === a.id) li.classList.add("editing");
    const [r, g, b] = colorFor(i);
    // A reviewer or admin reviews saved annotations here too (an annotator's own: the API, to keep rows short).
    const reviews = hasRole("reviewer") ? `<button class="accept-saved" title="accept">✓</button><button class="reject-saved" title="reject">⊘</button>` : "";
    li.innerHTML = `<span class="swatch" style="background:rgb(${r},${g},${b})"></span><span class="name"></span><span class="state"></span>${reviews}<button class="edit" title="edit its mask and label (E)">✎</button><button class="delete" title="delete">✕</button>`;
    li.querySelector(".name").textContent = `${a.label} · ${a.source}${a.seconds_spent != null ? ` · ${a.seconds_spent.toFixed(1)}s` : ""}`;
    const st = li.querySelector(".state"); st.textContent = a.review_state || ""; st.dataset.state = a.review_state || "";
    li.onclick = () => { S.selected = S.selected === a.id ? null : a.id; rebuildOverlay(); renderLists(); draw(); };
    li.ondblclick = () => startEdit(a);
    li.querySelector(".edit").onclick = (e) => { e.stopPropagation(); startEdit(a); };
    allowIf(li.querySelector(".edit"), editRefusal(a));
    li.querySelector(".delete").onclick = (e) => { e.stopPropagation(); confirmDelete(a); };
    allowIf(li.querySelector(".delete"), deleteRefusal(a));
    if (reviews) {
      const why = reviewRefusal(a);
      for (const action of ["accept", "reject"]) {
        const btn = li.querySelector(`.${action}-saved`);
        btn.onclick = (e) => { e.stopPropagation(); reviewSaved(a, action); };
        allowIf(btn, why || (a.review_state === `${action}ed` ? `already ${action}ed` : null));
      }
    }
    ul.appendChild(li);
  });
  const pl = $("pending"); pl.innerHTML = "";
  S.pending.forEach((a, i) => {
    const li = document.createElement("li"); li.dataset.id = a.id; li.className = `pending ${a.id === S.selectedPending ? "selected" : ""}`;
    const label = pendingLabel(a); // what Y / ✓ saves it as, shown before accepting
    const [r, g, b] = pendingColor(i);
    li.innerHTML = `<span class="swatch" style="background:rgb(${r},${g},${b})"></span><span class="name"></span><span class="as"></span><button class="accept-pending">✓</button><button class="reject-pending" title="reject (X)">✕</button>`;
    li.querySelector(".name").textContent = a._proposal ? `“${a.prompts.text}” ${a.score.toFixed(2)} · ${a.area}px`
      : `iou ${a.predicted_iou != null ? a.predicted_iou.toFixed(2) : "?"} · ${a.area}px`;
    li.querySelector(".as").textContent = `→ ${label}`;
    li.querySelector(".accept-pending").title = `accept as “${label}” (Y)`;
    if (a._proposal) li.classList.add("proposal");
    li.onclick = () => { S.selectedPending = S.selectedPending === a.id ? null : a.id; rebuildOverlay(); renderLists(); draw(); };
    li.querySelector(".accept-pending").onclick = (e) => { e.stopPropagation(); review(a.id, "accept"); };
    li.querySelector(".reject-pending").onclick = (e) => { e.stopPropagation(); review(a.id, "reject"); };
    const why = reviewRefusal(a); allowIf(li.querySelector(".accept-pending"), why); allowIf(li.querySelector(".reject-pending"), why);
    pl.appendChild(li);
  });
  const im = current(); if (im) $("image-pos").textContent = `${S.idx + 1}/${S.images.length}`;
}

// Roles (segany.server.permissions, the same rules): an annotator reviews and edits their own masks and machine
// proposals nobody owns, and deletes only their own; a reviewer or admin, anyone's. Controls the signed-in role
// cannot use are disabled with the reason as their tooltip, so normal use never meets the server's 403.
const ROLE_RANK = { annotator: 0, reviewer: 1, admin: 2 };
function hasRole(role) { return S.me != null && (ROLE_RANK[S.me.role] ?? -1) >= ROLE_RANK[role]; }
// Once another person has reviewed an annotation, its annotator can no longer change or delete it (server/permissions.py).
function reviewedByOther(a) { return a.reviewer_id != null && !(S.me && a.reviewer_id === S.me.id); }
function ownsOrReviews(a) {
  return a._proposal || hasRole("reviewer") || (S.me && a.annotator_id === S.me.id && !reviewedByOther(a));
}
function whose(a) {
  if (a.annotator_id == null) return "a machine proposal";
  return S.me && a.annotator_id === S.me.id ? "your annotation after another person's review" : "another person's annotation";
}
function reviewRefusal(a) {
  if (ownsOrReviews(a) || (a.annotator_id == null && a.review_state === "pending")) return null;
  return `${whose(a)}: reviewing it needs the reviewer or admin role (you are ${S.me ? S.me.role : "signed out"})`;
}
function deleteRefusal(a) {
  if (ownsOrReviews(a)) return null;
  return `${whose(a)}: deleting it needs the reviewer or admin role (you are ${S.me ? S.me.role : "signed out"})`;
}
function allowIf(btn, why) { btn.disabled = Boolean(why); if (why) { btn.title = why; btn.classList.add("not-allowed"); } }

// One readable line in the status bar (server errors can run to several lines); the whole text in its tooltip.
const STATUS_MAX = 140;
function setStatus(text, ready) {
  const s = $("status"); const line = String(text).replace(/\s+/g, " ").trim();
  s.textContent = line.length > STATUS_MAX ? `${line.slice(0, STATUS_MAX - 1)}…` : line;
  s.title = line.length > STATUS_MAX || line !== text ? String(text) : "";
  // "ready" (clicks allowed) only once the open image has loaded, whatever else reports in meanwhile
  if (ready !== undefined) s.dataset.ready = ready && imageLoaded() ? "1" : "0";
}

// A failure of something the user left behind (a save or review on another image): the status bar belongs to the
// open image, so it goes into a notice that stays until clicked.
function notify(text) {
  const n = $("notice"); n.textContent = `${text} (click to close)`; n.hidden = false;
}

// A model without a text path (no class head, no CLIP token) cannot take a phrase: the text box is disabled.
function setTextPrompts(on) {
  const why = on ? "" : "this model cannot segment from text (it needs a class head or a CLIP text token)";
  for (const id of ["text-prompt", "text-submit"]) {
    const el = $(id); if (el.dataset.title === undefined) el.dataset.title = el.title;
    el.disabled = !on; el.title = why || el.dataset.title;
  }
  $("text-form").title = why;
}

// ------------------------------------------------------------------------------------ editing
// Undo/redo: S.history holds the states before each edit, S.future the states undone since (a new edit drops them).
// A state keeps its prompts, candidates and edit as they are, but not a copy of its mask: each entry holds the
// pixels where its mask differs from the next state's, as runs [start, end) of row-major pixel indices (a brush
// stroke: the pixels it changed, recorded as it paints; a decode or a choice: old XOR new, over their boxes).
// XOR is its own inverse, so the same runs take the mask back (undo) and forward again (redo). A full copy per step
// kept 40 strokes on a 6000x4000 image at 960 MB; a stroke's runs are a few kB. The history is capped at
// S.historyMaxBytes as well as at 100 steps (oldest dropped first).
class Runs {
  constructor(a) { this.a = a || new Int32Array(16); this.n = a ? a.length : 0; }
  push(start, end) { // (a run that continues the last one extends it)
    if (this.n && this.a[this.n - 1] === start) { this.a[this.n - 1] = end; return; }
    if (this.n + 2 > this.a.length) { const b = new Int32Array(Math.max(16, 2 * this.a.length)); b.set(this.a); this.a = b; }
    this.a[this.n++] = start; this.a[this.n++] = end;
  }
  // Sorted, without slack: a pixel is flipped iff an odd number of boundaries lie at or before it, so equal
  // boundaries cancel in pairs (two dabs' touching runs become one; a pixel flipped twice is left alone).
  compact() {
    const b = this.a.slice(0, this.n).sort(); let k = 0;
    for (let i = 0; i < b.length; i++) { if (k && b[k - 1] === b[i]) k--; else b[k++] = b[i]; }
    this.a = b.slice(0, k); this.n = k; return this;
  }
}

const fullBox = () => [0, 0, S.W - 1, S.H - 1];
function extent(m) { return m ? m.box || fullBox() : null; } // where a mask's pixels may be (null: no mask)
function unionBox(a, b) {
  if (!a) return b; if (!b) return a;
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[2], b[2]), Math.max(a[3], b[3])];
}

// The runs of pixels where masks a and b differ (null: no mask, all 0) within rect, appended to `runs`.
function diffRuns(runs, a, b, rect) {
  const W = S.W; const x0 = Math.max(0, rect[0]), x1 = Math.min(W - 1, rect[2]);
  for (let y = Math.max(0, rect[1]), y1 = Math.min(S.H - 1, rect[3]); y <= y1; y++) {
    let start = -1; const e = y * W + x1;
    for (let i = y * W + x0; i <= e; i++) {
      if ((a ? a[i] : 0) !== (b ? b[i] : 0)) { if (start < 0) start = i; }
      else if (start >= 0) { runs.push(start, i); start = -1; }
    }
    if (start >= 0) runs.push(start, e + 1);
  }
  return runs;
}

// Flips the pixels of runs in m; returns the box they cover (for redrawing), null if none.
function flipRuns(m, a, n) {
  const W = S.W; let box = null;
  for (let k = 0; k < n; k += 2) {
    const s = a[k], e = a[k + 1];
    for (let i = s; i < e; i++) m[i] ^= 1;
    const ya = (s / W) | 0, yb = ((e - 1) / W) | 0;
    box = unionBox(box, ya === yb ? [s - ya * W, ya, e - 1 - ya * W, ya] : [0, ya, W - 1, yb]);
  }
  return box;
}

// A mask as runs of its pixels, with its box: an edit's base (S.editBase), small and never changed.
function maskRuns(m) {
  return { runs: m ? diffRuns(new Runs(), null, m, extent(m)).compact().a : new Int32Array(0), box: m ? extent(m).slice() : [0, 0, 0, 0] };
}

function emptyMask() { const m = new Uint8Array(S.W * S.H); m.box = [0, 0, 0, 0]; return m; }

// Every change of S.mask other than the brush's (which records as it paints) and undo/redo goes through here:
// what changed is added to the newest history entry, so undo can take it back.
function setMask(m) {
  const old = S.mask; if (old === m) return;
  const top = S.history[S.history.length - 1];
  if (top && (old || m)) diffRuns(top.diff, old, m, unionBox(extent(old), extent(m)));
  S.mask = m;
}

function stateOf(diff) {
  return { points: S.points.slice(), box: S.box && S.box.slice(), candidates: S.candidates, chosen: S.chosen,
    lowres: S.lowres, editing: S.editing, editBase: S.editBase, editCut: S.editCut,
    noMask: !S.mask, maskBox: S.mask && S.mask.box ? S.mask.box.slice() : null, diff: diff || new Runs() };
}

function snapshot() {
  S.editSeq++;
  const top = S.history[S.history.length - 1]; if (top) top.diff.compact(); // done: only the newest one grows
  S.history.push(stateOf()); S.future = [];
  if (S.history.length > 100) S.history.shift();
  trimHistory();
}

// Takes the state of entry h (its mask: the current one with h's runs flipped, in a new array: a save on its way
// holds the old one).
function applyState(h) {
  S.editSeq++;
  let m = null;
  if (!h.noMask) {
    m = S.mask ? S.mask.slice() : new Uint8Array(S.W * S.H);
    const changed = flipRuns(m, h.diff.a, h.diff.n); m.box = h.maskBox;
    if (S.mask && S.maskShown === S.mask) { S.maskShown = m; markDirty(changed); } // only the flipped pixels are redrawn
  }
  const was = S.editing;
  setCandidates(h.candidates);
  Object.assign(S, { points: h.points, box: h.box, mask: m, chosen: h.chosen, lowres: h.lowres, editing: h.editing,
    editBase: h.editBase, editCut: h.editCut });
  if (was !== S.editing) editingChanged(was);
  renderChoices(); draw();
}

// (a stroke or box drag in progress ends: its next moves would edit the state undo left)
function undo() {
  const h = S.history.pop(); if (!h) return; S.drag = null; h.diff.compact(); S.future.push(stateOf(h.diff)); applyState(h);
}

function redo() { const f = S.future.pop(); if (!f) return; S.drag = null; S.history.push(stateOf(f.diff)); applyState(f); }

// The memory the history holds: each step's runs, and (once each) the edit bases and decodes it refers to.
function historyBytes() {
  const seen = new Set(); let n = 0;
  const once = (x, size) => { if (x && !seen.has(x)) { seen.add(x); n += size(x); } };
  const candBytes = (cands) => cands.reduce((t, c) => t + (c.lowres instanceof Float32Array ? c.lowres.byteLength : 0)
    + (c.rle ? 8 * c.rle.counts.length : 0) + (c.mask ? c.mask.byteLength : 0), 0);
  for (const h of S.history.concat(S.future)) {
    n += h.diff.a.byteLength; once(h.editBase, (b) => b.runs.byteLength); once(h.candidates, candBytes);
  }
  return n;
}
S.historyBytes = historyBytes; // for the browser tests

// Over the cap, the oldest steps go (then the farthest redo steps); the newest entry, which may still be
// recording (a stroke, a decode on its way), always stays.
function trimHistory() {
  while (S.history.length + S.future.length > 1 && historyBytes() > S.historyMaxBytes) {
    if (S.history.length > 1) S.history.shift(); else S.future.shift();
  }
}

function clearPrompts() {
  S.editSeq++;
  const was = S.editing; setCandidates([]);
  Object.assign(S, { points: [], box: null, mask: null, lowres: null, history: [], future: [], t0: null, chosen: 0,
    editing: null, editBase: null, editCut: false });
  if (was) editingChanged(was);
  renderChoices(); draw();
}

// Esc and the Clear button: like clearPrompts, but one Ctrl+Z brings the mask back (it wiped the history, so a
// stray Esc lost the whole mask). A new image and a save still start from nothing (clearPrompts). During an edit
// they cancel it (the saved annotation stays as it was; Ctrl+Z goes back into the edit).
function clearUndoably() {
  if (!S.points.length && !S.box && !S.mask && !S.editing) return;
  snapshot();
  const was = S.editing; setCandidates([]);
  Object.assign(S, { points: [], box: null, lowres: null, chosen: 0, editing: null, editBase: null, editCut: false });
  setMask(null);
  if (was) { editingChanged(was); setStatus(`edit of annotation ${was.id} cancelled (Ctrl+Z goes back to it)`, true); }
  renderChoices(); draw();
}

// While a decode runs, the mask shown is the one before the last prompt: saving it, or choosing among its
// candidates, stored a mask whose prompts list a click it never saw.
function computing() {
  if (S.decoding > 0) {
    S.waited = true; setStatus("the mask is still being computed: try again when it shows", true); return true;
  }
  return false;
}

// The mask shown for candidate c: its own, or during an edit with clicks, the mask before the clicks with c's
// object added (or cut out).
function shownMask(c) {
  const d = maskOf(c);
  if (!S.editing || !S.editBase) return copyMask(d);
  const m = new Uint8Array(S.W * S.H); const base = S.editBase; const W = S.W;
  for (let k = 0; k < base.runs.length; k += 2) m.fill(1, base.runs[k], base.runs[k + 1]);
  const [x0, y0, x1, y1] = extent(d); const v = S.editCut ? 0 : 1;
  for (let y = y0; y <= y1; y++) for (let i = y * W + x0, e = y * W + x1; i <= e; i++) if (d[i]) m[i] = v;
  m.box = S.editCut ? base.box.slice() : unionBox(base.box, extent(d)).slice();
  return m;
}

function choose(k) {
  if (!S.candidates[k] || computing()) return;
  snapshot(); S.chosen = k; setMask(shownMask(S.candidates[k])); S.lowres = S.candidates[k].lowres;
  renderChoices(); draw();
}

function startTimer() { if (S.t0 === null) S.t0 = performance.now(); }

async function addPrompt(p) {
  startTimer(); snapshot();
  if (S.editing && !S.points.length && !S.box) { // an edit's first click: the mask as it is now is the base
    S.editBase = maskRuns(S.mask); S.editCut = !p.box && p.label === 0;
  }
  if (p.box) S.box = p.box; else S.points.push(p);
  await decode();
}

// A brush stroke begins (one undo step). During an edit, the clicks' object becomes part of the mask: the brush
// edits it, and the next click starts a new object.
function strokeStart() {
  startTimer(); snapshot();
  if (S.editing && (S.points.length || S.box)) {
    setCandidates([]); Object.assign(S, { points: [], box: null, lowres: null, chosen: 0, editBase: null, editCut: false });
    renderChoices();
  }
}

function strokeEnd() {
  const top = S.history[S.history.length - 1]; if (top) top.diff.compact();
  trimHistory();
}

// One dab of the brush: the pixels whose centres lie within S.brush image pixels of (x, y). The pixels it changes
// are recorded in the newest history entry (each changes at most once per stroke, so they are the stroke's runs).
function paint(x, y, erase) {
  if (!S.mask) setMask(emptyMask());
  const m = S.mask; const r = S.brush; const v = erase ? 0 : 1; const W = S.W;
  const top = S.history[S.history.length - 1]; const runs = top ? top.diff : null;
  const ya = Math.max(0, Math.ceil(y - r - 0.5)), yb = Math.min(S.H - 1, Math.floor(y + r - 0.5));
  let x0 = W, x1 = -1;
  for (let yy = ya; yy <= yb; yy++) {
    const dy = yy + 0.5 - y; const half = Math.sqrt(Math.max(0, r * r - dy * dy));
    const xa = Math.max(0, Math.ceil(x - half - 0.5)), xb = Math.min(W - 1, Math.floor(x + half - 0.5));
    if (xb < xa) continue;
    x0 = Math.min(x0, xa); x1 = Math.max(x1, xb);
    let start = -1; const e = yy * W + xb;
    for (let i = yy * W + xa; i <= e; i++) {
      if (m[i] !== v) { m[i] = v; if (start < 0) start = i; }
      else if (start >= 0) { if (runs) runs.push(start, i); start = -1; }
    }
    if (start >= 0 && runs) runs.push(start, e + 1);
  }
  if (x1 < 0) return;
  const rect = [x0, ya, x1, yb]; markDirty(rect);
  if (!erase && m.box) m.box = unionBox(m.box, rect); // (erasing leaves the box as it was: it may be loose)
}

// The brush between two pointer positions, at steps of half its radius: a fast stroke is a line, not dots.
function strokeTo(p) {
  const d = S.drag; const dx = p.x - d.last.x, dy = p.y - d.last.y;
  const n = Math.max(1, Math.ceil(Math.hypot(dx, dy) / Math.max(0.5, S.brush / 2)));
  for (let k = 1; k <= n; k++) paint(d.last.x + dx * k / n, d.last.y + dy * k / n, d.erase);
  d.last = p;
}

// ------------------------------------------------------------------------- editing a saved annotation
// E (the selected annotation), its row's ✎ or a double-click on its row loads a saved mask as the current one,
// with its label in the label box. The brush and eraser change it; a click (or box) adds the object it finds, a
// first click on the background cuts the object there out instead; Enter saves it in place (PATCH, with the
// revision the edit began from: if someone changed it meanwhile the server answers 409, which is said, and the
// list is fetched again; and with the edit's own key, edit_uuid, so that it can be sent again, see sendSave).
// Esc cancels; undo goes back step by step, past the start of the edit too.
function editRefusal(a) {
  if (ownsOrReviews(a)) return null;
  return `${whose(a)}: editing it needs the reviewer or admin role (you are ${S.me ? S.me.role : "signed out"})`;
}

function startEdit(a) {
  if (!a || !imageLoaded() || savingHere()) return;
  if (S.editing && S.editing.id === a.id && !S.editing.stale) return;
  const why = editRefusal(a); if (why) { setStatus(`not editable: ${why}`, true); return; }
  if (computing()) return;
  snapshot(); // Ctrl+Z goes back to what was there (an unsaved mask too)
  const was = S.editing;
  S.editing = { id: a.id, uuid: a.uuid, revision: a.revision, label: a.label, original: a._mask, t0: performance.now(),
    prevLabel: was ? was.prevLabel : $("label").value };
  setCandidates([]);
  Object.assign(S, { points: [], box: null, lowres: null, chosen: 0, editBase: null, editCut: false, selected: a.id });
  setMask(copyMask(a._mask));
  editingChanged(was); renderChoices(); draw();
  setStatus(`editing annotation ${a.id}: brush, erase or click to change it, or type its label; Enter saves, Esc cancels`, true);
}

// The page follows S.editing (started, ended, or undone/redone into): the label box holds the edit's label (what
// was typed in it comes back with it), the buttons say what they do, and the overlay hides the mask being edited.
function editingChanged(was) {
  const e = S.editing;
  if (was) was.typed = $("label").value;
  if (e) $("label").value = e.typed !== undefined ? e.typed : e.label;
  else if (was) $("label").value = was.prevLabel;
  $("accept").textContent = e ? "Save edit" : "Accept";
  $("clear").textContent = e ? "Cancel edit" : "Clear";
  document.body.dataset.editing = e ? String(e.id) : "";
  rebuildOverlay(); renderLists();
}

function sameMask(a, b) {
  if (!a || !b || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function editLabel() { return $("label").value.trim() || "object"; }

function editChanged() {
  const e = S.editing;
  return Boolean(S.points.length || S.box || editLabel() !== e.label || !sameMask(S.mask, e.original));
}

async function saveEdit() {
  const e = S.editing; const a = S.saved.find((x) => x.id === e.id);
  if (e.stale || !a) {
    setStatus(`annotation ${e.id} was changed or deleted since this edit began: Esc drops the edit, then E opens its current version`, true);
    return;
  }
  if (!S.mask || !S.mask.some((v) => v)) { setStatus("an annotation cannot be empty: Del deletes it, Esc cancels the edit", true); return; }
  const label = editLabel(); const maskChanged = !sameMask(S.mask, e.original);
  if (!maskChanged && label === a.label) { // (clicks that changed nothing included)
    clearPrompts(); setStatus(`annotation ${a.id} unchanged`, true); return;
  }
  const body = { uuid: e.uuid, revision: e.revision, seconds_spent: (performance.now() - e.t0) / 1000 };
  if (maskChanged) body.segmentation = maskToRle(S.mask, S.H, S.W);
  if (label !== a.label) body.label = label;
  // The edit's key: the same while what it saves is (Enter again after a failure sends it again, and if the
  // failed one was stored after all, the server answers with it instead of a false 409); anything else gets a
  // new one, as the server refuses a key sent with another edit (409). Told by the runs themselves, not by
  // editSeq: a brush stroke still drawn after Enter changes the mask in place without counting as an edit.
  // (seconds_spent is the time until each try: the server does not compare it.)
  body.edit_uuid = stableKey(e, "saveKey",
    JSON.stringify([e.revision, label, body.segmentation ? body.segmentation.counts : null]));
  const token = S.imageToken; const im = current(); const mask = S.mask; const job = { token, seq: S.editSeq };
  S.saves.push(job); setStatus("saving the edit…", false);
  let out;
  try { out = await sendSave(`/api/annotations/${e.id}`, { method: "PATCH", json: body }); }
  catch (err) {
    if (stale(token)) { notify(`the edit of annotation ${e.id} on ${im.file_name} was not saved: ${err.message}`); return; }
    if (err.status === 409 || err.status === 404) {
      e.stale = true;
      setStatus(`not saved: someone else changed or deleted annotation ${e.id} since your edit began; the list shows it as it is now. `
        + `Esc drops your edit, E opens the current version (${err.message})`, true);
      await refreshAnnotations(token); rebuildOverlay(); draw();
      return;
    }
    setStatus(`edit not saved: ${err.message}`, true);
    if (err.status === 403) await refreshAnnotations(token);
    return;
  } finally { S.saves = S.saves.filter((x) => x !== job); }
  if (stale(token)) return;
  Object.assign(a, out, { _mask: mask }); addLabel(a.label);
  Object.assign(e, { revision: a.revision, label: a.label, original: mask, t0: performance.now() });
  if (job.seq === S.editSeq) clearPrompts(); // an edit made meanwhile (undo) goes on, from the saved revision
  rebuildOverlay(); renderLists(); draw();
  setStatus(`saved the edit of annotation ${a.id}`, true);
}

// Alt (or Ctrl/⌘) + click on the image selects the saved annotation under the pointer (the topmost), as its row does.
function selectAt(p) {
  const x = Math.floor(p.x), y = Math.floor(p.y);
  if (x < 0 || y < 0 || x >= S.W || y >= S.H) return;
  const hit = [...S.saved].reverse().find((a) => a._mask[y * S.W + x]);
  S.selected = hit ? hit.id : null;
  rebuildOverlay(); renderLists(); draw();
  if (hit) setStatus(`selected annotation ${hit.id} (${hit.label}): E edits it, Del deletes it`, true);
}

function editKey() {
  const a = S.selected != null && S.saved.find((x) => x.id === S.selected);
  if (a) { startEdit(a); return; }
  setStatus(S.saved.length ? "select an annotation first (its row, or Alt+click it on the image), then E edits it"
    : "no saved annotation on this image to edit", true);
}

// One save per mask: Enter Enter (or a held key) sends it once; a repeat after a failure sends the same uuid.
function savingHere() { return S.saves.some((x) => x.token === S.imageToken); }

async function accept() {
  if (!imageLoaded() || savingHere()) return; // nothing of this image to save yet / this mask is being saved
  if (computing()) return;
  if (S.editing) { await saveEdit(); return; }
  if (!S.mask || !S.mask.some((v) => v)) { setStatus("nothing to save: click on an object first", true); return; }
  const seconds = S.t0 === null ? null : (performance.now() - S.t0) / 1000;
  if (!S.saveKey || S.saveKey.seq !== S.editSeq) S.saveKey = { seq: S.editSeq, uuid: uuid4() };
  const body = {
    uuid: S.saveKey.uuid, segmentation: maskToRle(S.mask, S.H, S.W), label: $("label").value.trim() || "object",
    source: "manual", seconds_spent: seconds,
    prompts: { points: S.points.map((p) => [p.x, p.y]), labels: S.points.map((p) => p.label), box: S.box,
      brush: S.mode === "brush" || undefined, chosen: S.chosen },
    predicted_iou: S.candidates[S.chosen] ? S.candidates[S.chosen].score : null,
  };
  let saved = null; const im = current(); const token = S.imageToken; const mask = S.mask;
  const job = { token, seq: S.editSeq }; S.saves.push(job);
  setStatus("saving…", false);
  try { saved = await sendSave(`/api/images/${im.id}/annotations`, { method: "POST", json: body }); }
  catch (e) {
    if (token !== S.imageToken) { notify(`the mask on ${im.file_name} was not saved: ${e.message}`); return; }
    // A 409 for this mask's key after a try whose answer was lost (stored after all) and a changed label: show
    // the stored annotation instead of the API's wording, so the user edits it rather than saving a duplicate.
    if (e.status === 409 && await storedAfterAll(token, body.uuid)) return;
    setStatus(`save failed: ${e.message}`, true);
    return;
  } finally { S.saves = S.saves.filter((x) => x !== job); }
  if (stale(token)) {
    // Saved, but the user is on another image now: leave that one alone. Unless they came back to this image
    // meanwhile: its list was fetched before the save landed, so the new mask was invisible (and drawn twice).
    if (saved && current() && current().id === im.id && imageLoaded()) await refreshAnnotations(S.imageToken);
    return;
  }
  if (seconds !== null) { S.spm.push(seconds); $("spm").textContent = (S.spm.reduce((a, b) => a + b, 0) / S.spm.length).toFixed(1); }
  saved._mask = mask;
  S.saved.push(saved); addLabel(saved.label);
  if (job.seq === S.editSeq) clearPrompts(); // an edit made meanwhile (undo, Esc) is the user's newer state: kept
  rebuildOverlay(); renderLists(); draw();
  setStatus(`saved annotation ${saved.id}`, true);
}

// After a refused save: true (and the saved annotation selected, the prompts cleared, the status saying so) when
// an earlier try of it was stored under `uuid` after all.
async function storedAfterAll(token, uuid) {
  await refreshAnnotations(token);
  const kept = stale(token) ? null : S.saved.find((x) => x.uuid === uuid);
  if (!kept) return false;
  clearPrompts(); S.selected = kept.id; rebuildOverlay(); renderLists(); draw();
  setStatus(`not saved again: a lost try stored it as annotation ${kept.id} (${kept.label}), now selected: E edits it`, true);
  return true;
}

// A saved annotation is only deleted when the user names it (selected in the list, or its ✕) and confirms.
function confirmDelete(a) {
  if (!a) return;
  const why = deleteRefusal(a); if (why) { setStatus(`not deleted: ${why}`, true); return; }
  if (!window.confirm(`Delete annotation ${a.id} (${a.label})? This cannot be undone.`)) return;
  deleteAnnotation(a.id);
}

// Delete/Backspace: the selected saved annotation (confirmed); with none selected, Backspace takes back the
// last click of the unsaved mask, as in a text field, and Delete says how to pick one.
function deleteKey(backspace) {
  if (backspace && S.editing) { undo(); return; } // (Del deletes the annotation being edited, after asking)
  const a = S.selected !== null && S.saved.find((x) => x.id === S.selected);
  if (a) { confirmDelete(a); return; }
  if (backspace && (S.points.length || S.box || S.mask)) { undo(); return; }
  if (S.saved.length) setStatus("select an annotation in the list first, then Delete removes it");
}

// The uuid goes with the id: ids are reused after a delete, so a stale page must not delete another annotation
// (the server answers 409). An annotation that is gone or replaced leaves the list with the server's message.
async function deleteAnnotation(id) {
  const token = S.imageToken; const a = S.saved.find((x) => x.id === id); const im = current();
  let msg = `deleted annotation ${id}`;
  try { await api(`/api/annotations/${id}?uuid=${encodeURIComponent(a ? a.uuid : "")}`, { method: "DELETE" }); }
  catch (e) {
    if (stale(token)) { notify(`annotation ${id} on ${im.file_name} was not deleted: ${e.message}`); return; }
    if (REFUSED.has(e.status)) { setStatus(`not deleted: ${e.message}`, true); await refreshAnnotations(token); return; }
    setStatus(`delete failed: ${e.message}`, true); return;
  }
  if (stale(token)) return;
  S.saved = S.saved.filter((x) => x.id !== id); if (S.selected === id) S.selected = null;
  if (S.editing && S.editing.id === id) clearPrompts(); // the edit of it ends with it (its undo steps too)
  rebuildOverlay(); renderLists(); draw(); setStatus(msg, true);
}

// Y / X take the selected pending mask, else the first one; one being accepted or rejected already is skipped,
// so Y Y reviews two masks.
function nextPendingId() {
  if (S.selectedPending != null && !S.reviewing.has(S.selectedPending)) return S.selectedPending;
  const a = S.pending.find((x) => !S.reviewing.has(x.id)); return a ? a.id : null;
}

async function review(id, action) {
  if (!imageLoaded() || S.reviewing.has(id)) return; // a second press for a mask already on its way is dropped
  S.reviewing.add(id);
  try { await reviewOne(id, action); } finally { S.reviewing.delete(id); }
}

async function reviewOne(id, action) {
  const prop = S.pending.find((x) => x.id === id && x._proposal);
  if (prop) { await reviewProposal(prop, action); return; }
  const t0 = S.pendingShownAt || performance.now();
  const body = { seconds_spent: (performance.now() - t0) / 1000 / Math.max(1, S.pending.length) };
  const pre = S.pending.find((x) => x.id === id);
  const why = pre && reviewRefusal(pre); if (why) { setStatus(`not ${action}ed: ${why}`, true); return; }
  if (pre) { // refused (409) if the id now names another annotation, or another reviewer got there first
    body.uuid = pre.uuid; if (pre.revision) body.revision = pre.revision;
  }
  if (action === "accept") body.label = pendingLabel(pre || {});
  body.edit_uuid = reviewKey(pre || {}, action, body);
  const a = await postReview(id, action, body);
  if (!a) return;
  const p = S.pending.find((x) => x.id === id); S.pending = S.pending.filter((x) => x.id !== id);
  if (action === "accept") { // (p is gone if the list was fetched again meanwhile: the answer's own mask then)
    a._mask = p ? p._mask : a.segmentation && rleToMask(a.segmentation);
    if (a._mask && !S.saved.some((x) => x.id === a.id)) S.saved.push(a);
  }
  if (S.selectedPending === id) S.selectedPending = null;
  rebuildOverlay(); renderLists(); draw();
}

// A review's key (edit_uuid): the same while what it sends is (the retries of one click, and ✓ or Y again after a
// failure: if the failed one was stored after all, the server answers with it instead of a false 409, or 403 for
// an annotator's rejected proposal); anything else gets a new one, as the server refuses a key sent with another
// review (409). Kept on the mask it reviews.
function reviewKey(a, action, body) {
  return stableKey(a, "_reviewKey", JSON.stringify([action, body.uuid, body.revision, body.label]));
}

// holder[prop]'s uuid while `what` (what a request sends) stays the same, a new one when it changes.
function stableKey(holder, prop, what) {
  if (!holder[prop] || holder[prop].what !== what) holder[prop] = { what, uuid: uuid4() };
  return holder[prop].uuid;
}

// POST an accept/reject (retried as a save is, see sendSave: the mask stays in its list, and a second press for
// it is dropped, until the answer); null when it failed (the message is shown and a stale list fetched again) or
// when the user left the image meanwhile.
async function postReview(id, action, body) {
  const token = S.imageToken; const im = current();
  try {
    const out = await sendSave(`/api/annotations/${id}/${action}`, { method: "POST", json: body });
    return stale(token) ? null : out;
  } catch (e) {
    if (stale(token)) { notify(`${action} of annotation ${id} on ${im.file_name} failed: ${e.message}`); return null; }
    setStatus(`${action} failed: ${e.message}`, true);
    if (REFUSED.has(e.status)) await refreshAnnotations(token); // the list was stale: show what is there now
    return null;
  }
}

// A refusal (403 someone reviewed it meanwhile, 404 gone, 409 the id now names another annotation) means the
// list is stale: the current image's annotations are fetched again. The unsaved mask, clicks and the page-only
// text proposals stay as they are.
const REFUSED = new Set([403, 404, 409]);
async function refreshAnnotations(token) {
  const im = current(); let anns;
  try { anns = await (await api(`/api/images/${im.id}/annotations?state=accepted,pending`)).json(); }
  catch (e) { return; } // the refusal's message stays in the status bar
  if (stale(token)) return;
  const withMask = (a) => Object.assign(a, { _mask: rleToMask(a.segmentation) });
  S.saved = anns.filter((a) => a.review_state === "accepted").map(withMask);
  S.pending = anns.filter((a) => a.review_state === "pending").map(withMask).concat(S.pending.filter((a) => a._proposal));
  if (!S.saved.some((a) => a.id === S.selected)) S.selected = null;
  if (!S.pending.some((a) => a.id === S.selectedPending)) S.selectedPending = null;
  const e = S.editing; // an edit of a version that is gone (edited or deleted elsewhere) cannot be saved
  if (e && !S.saved.some((a) => a.id === e.id && a.uuid === e.uuid && a.revision === e.revision)) e.stale = true;
  rebuildOverlay(); renderLists(); draw();
}

// Reviewing a saved annotation (a reviewer's or admin's ✓/⊘ on its row): the uuid goes with the id, as for
// pending rows; the row stays, showing its new review state, until the image is opened again.
async function reviewSaved(a, action) {
  const why = reviewRefusal(a); if (why) { setStatus(`not ${action}ed: ${why}`, true); return; }
  const body = { uuid: a.uuid, revision: a.revision };
  body.edit_uuid = reviewKey(a, action, body);
  const out = await postReview(a.id, action, body);
  if (!out) return;
  Object.assign(a, out, { _mask: a._mask });
  if (S.editing && S.editing.id === a.id) S.editing.revision = a.revision; // (this page's own review)
  renderLists(); setStatus(`${action}ed annotation ${a.id}`, true);
}

// One pre-fill per image at a time: while the server works (seconds on a CPU) the button is disabled and says
// so for that image only. Opening another image starts its own pre-fill; the old one's late answer is dropped.
function prefillButton(busy) {
  const btn = $("prefill"); btn.disabled = busy; btn.classList.toggle("busy", busy); btn.textContent = busy ? "Pre-filling…" : "Pre-fill";
}
async function prefill() {
  const token = S.imageToken; const im = current();
  if (!im || !imageLoaded()) return; // opening the image pre-fills it in the semi stage; F waits for it to load
  if (S.prefillToken === token) return; // this image's pre-fill is still running
  S.prefillToken = token; prefillButton(true);
  setStatus("pre-filling…");
  try {
    const list = await (await api(`/api/images/${im.id}/prefill`, { method: "POST", json: {} })).json();
    if (stale(token)) return; // pre-filled an image the user has left: its masks stay pending in the store
    // Merged into the list: other pending masks (the engine's, page-only text proposals) stay, and the ones
    // already shown keep their place (and selection).
    const got = new Map(list.map((a) => [a.id, Object.assign(a, { _mask: rleToMask(a.segmentation) })]));
    S.pending = S.pending.map((a) => (got.has(a.id) ? got.get(a.id) : a));
    const shown = new Set(S.pending.map((a) => a.id));
    S.pending.push(...list.filter((a) => !shown.has(a.id)));
    S.pendingShownAt = performance.now();
    rebuildOverlay(); renderLists(); draw(); setStatus(`${list.length} pre-filled masks to review`, true);
  } catch (e) { if (!stale(token)) setStatus(`pre-fill failed: ${e.message}`, true); }
  finally { if (S.prefillToken === token) { S.prefillToken = null; prefillButton(false); } }
}

// Text prompt → proposed masks (POST /api/images/{id}/text), shown in the review list like pre-fills. They
// live only in the page until accepted; an accepted one is saved as source "semi" with the phrase in prompts.
async function proposeText(ev) {
  if (ev) ev.preventDefault();
  const text = $("text-prompt").value.trim();
  if (!text) { setStatus("type what to segment, e.g. 'dog'", true); return; }
  const im = current(); const token = S.imageToken;
  if (!im || !imageLoaded()) return;
  setStatus(`looking for “${text}”…`, false);
  try {
    const res = await (await api(`/api/images/${im.id}/text`, { method: "POST", json: { text } })).json();
    if (stale(token)) return;
    S.pending = S.pending.filter((a) => !a._proposal);
    res.proposals.forEach((p) => S.pending.push(Object.assign(p, {
      id: `text-${++S.proposalSeq}`, _proposal: true, _mask: rleToMask(p.segmentation), prompts: { text: res.text } })));
    S.textPrompt = res.text; S.pendingShownAt = performance.now();
    rebuildOverlay(); renderLists(); draw();
    setStatus(res.proposals.length ? `${res.proposals.length} masks for “${res.text}” to review (Y/X)`
      : `no mask found for “${res.text}”`, true);
  } catch (e) { if (!stale(token)) setStatus(`text prompt failed: ${e.message}`, true); }
}

async function reviewProposal(p, action) {
  const token = S.imageToken; const im = current();
  S.pending = S.pending.filter((x) => x.id !== p.id);
  if (S.selectedPending === p.id) S.selectedPending = null;
  if (action === "accept") {
    // A save as any other (sent through sendSave): one uuid per proposal, kept across retries (sendSave's own, and
    // the user's accept again after a failure), so the server stores it once and answers a repeat with that row; a
    // lost answer is neither shown as a failure nor stored twice.
    if (!p.saveUuid) p.saveUuid = uuid4();
    const body = {
      uuid: p.saveUuid, segmentation: p.segmentation, label: p.label, source: "semi", predicted_iou: p.score,
      seconds_spent: (performance.now() - (S.pendingShownAt || performance.now())) / 1000,
      prompts: { text: p.prompts.text, label_score: p.score },
    };
    try {
      const saved = await sendSave(`/api/images/${im.id}/annotations`, { method: "POST", json: body });
      if (stale(token)) return;
      saved._mask = p._mask; S.saved.push(saved); addLabel(saved.label);
      setStatus(`saved “${p.prompts.text}” as annotation ${saved.id}`, true);
    } catch (e) {
      if (stale(token)) { notify(`“${p.prompts.text}” on ${im.file_name} was not saved: ${e.message}`); return; }
      S.pending.push(p); setStatus(`save failed: ${e.message}`, true);
    }
  }
  rebuildOverlay(); renderLists(); draw();
}

// The label accepting a pending mask gives it: a proposal's or class-head model's own label, else the label box's.
function pendingLabel(a) {
  if (a._proposal || (a.label && a.label !== "object")) return a.label;
  return $("label").value.trim() || "object";
}

// The label choices are the project's list (replaced when an admin changes it in the Project box).
function setLabels(labels) {
  const dl = $("labels"); dl.replaceChildren(); (labels || []).forEach(addLabel);
  if (labels && labels.length && !$("label").value.trim()) $("label").value = labels[0];
}

function addLabel(name) {
  const dl = $("labels");
  if (![...dl.options].some((o) => o.value === name)) { const o = document.createElement("option"); o.value = name; dl.appendChild(o); }
}

// -------------------------------------------------------------------------------------- images
function current() { return S.images[S.idx]; }

// Every answer that belongs to one image (embedding, decode, pre-fill, text find, save, review) is requested
// with the navigation counter of that moment and dropped when the user has moved on since (S.staleDrops counts them).
function stale(token) {
  if (token === S.imageToken) return false;
  S.staleDrops = (S.staleDrops || 0) + 1; return true;
}

// The mask being drawn is only in the page: say so before leaving it (another image, or the page itself). A mask
// whose save is on its way is not unsaved (a failure is still reported, see notify).
function hasUnsaved() {
  if (S.saves.some((x) => x.token === S.imageToken && x.seq === S.editSeq)) return false;
  if (S.editing) return editChanged();
  return Boolean(S.points.length || S.box || (S.mask && S.mask.some((v) => v)));
}

// The open image is usable (picture, embedding, lists all in): only then do clicks, saves and reviews go through,
// so nothing drawn on the previous picture can be saved to the next image.
function imageLoaded() { return S.loadedToken === S.imageToken; }

function navigate(step) {
  const idx = S.idx + step;
  if (idx < 0 || idx >= S.images.length) return;
  if (hasUnsaved() && !window.confirm("Leave this image? Its unsaved mask will be lost (Cancel, then Enter saves it).")) return;
  openImage(idx);
}

async function openImage(idx) {
  if (idx < 0 || idx >= S.images.length) return;
  S.idx = idx; S.imageToken++; const token = S.imageToken; const im = current();
  if (S.prefillToken != null) { S.prefillToken = null; prefillButton(false); } // the previous image's pre-fill: its answer is dropped
  clearPrompts(); S.saved = []; S.pending = []; S.selected = null; S.selectedPending = null; S.emb = null; S.embTensor = null; S.imageSide = null; S.overlay = null;
  S.saveKey = null; S.drag = null; $("retry").hidden = true; // (a drag begun on the last image ends with it)
  setStatus(`loading ${im.file_name}…`, false);
  $("image-name").textContent = im.file_name;
  localStorage.setItem("segany.idx", String(idx));
  // Each part names itself when it fails, so the status can say what did not load.
  const part = (what, p) => p.catch((e) => { e.part = what; throw e; });
  try {
    const [blob, embRes, anns] = await Promise.all([
      part("image file", api(`/api/images/${im.id}/file`).then((r) => r.blob())),
      S.model ? part("embedding", api(`/api/images/${im.id}/embedding`)) : Promise.resolve(null),
      part("annotations", api(`/api/images/${im.id}/annotations?state=accepted,pending`).then((r) => r.json())),
    ]);
    if (token !== S.imageToken) return;
    const bitmap = await part("picture", pictureOf(blob, im));
    if (token !== S.imageToken) { bitmap.close(); return; }
    const old = S.img; S.img = bitmap; S.W = bitmap.width; S.H = bitmap.height;
    if (old) old.close(); // (the GPU/decoded memory of the last picture, at once rather than at GC)
    fitView(); // each image opens fitted to the stage
    S.saved = anns.filter((a) => a.review_state === "accepted").map((a) => Object.assign(a, { _mask: rleToMask(a.segmentation) }));
    S.pending = anns.filter((a) => a.review_state === "pending").map((a) => Object.assign(a, { _mask: rleToMask(a.segmentation) }));
    S.pendingShownAt = performance.now();
    rebuildOverlay(); renderLists(); draw();
    if (embRes) {
      S.embShape = embRes.headers.get("X-Embedding-Shape").split(",").map(Number);
      const buf = await part("embedding", embRes.arrayBuffer());
      if (token !== S.imageToken) return;
      S.emb = new Float32Array(buf);
      if (S.ortReady) { // the decoder's image-only part, before the first click
        await S.ortReady;
        if (token !== S.imageToken) return;
        try { await prepareImageSide(); } catch (e) { console.warn("image-side decoder failed, using the server", e); S.session = null; }
        if (token !== S.imageToken) return;
      }
    }
  } catch (e) {
    if (token !== S.imageToken) return; // another image was opened meanwhile: its own load reports
    console.warn(`loading ${im.file_name} failed`, e);
    S.loadFailed = token; $("retry").hidden = false;
    const again = e.status === 401 ? "sign in again and it reloads" : "R or Retry loads it again, N/P moves on";
    setStatus(`could not load ${im.file_name} (${e.part || "image"}): ${e.message}; ${again}`, false);
    return;
  }
  S.loadedToken = token; S.loadFailed = null;
  setStatus(`${im.file_name} ready`, true);
  if (S.project.stage === "semi" && !S.pending.length) prefill();
}

// The image file → a bitmap in the frame the server's model sees (its width and height in the image list).
async function pictureOf(blob, im) {
  let bitmap;
  try { bitmap = await createImageBitmap(blob); } catch (e) {
    throw new Error(`this browser cannot decode the file (${blob.type || "unknown type"}, ${blob.size} bytes)`);
  }
  if (im.width && im.height && (bitmap.width !== im.width || bitmap.height !== im.height)) {
    const got = `${bitmap.width}x${bitmap.height}`; bitmap.close();
    throw new Error(`the browser shows it as ${got} pixels but the server's model sees ${im.width}x${im.height} `
      + "(EXIF orientation?): masks would not line up, so it is not opened");
  }
  return bitmap;
}

function retryImage() { if (S.loadFailed === S.imageToken && S.images.length) openImage(S.idx); }

// ------------------------------------------------------------------------------------- pointer
function bindCanvas() {
  const cv = $("view"); const st = $("stage");
  st.addEventListener("contextmenu", (e) => e.preventDefault());
  st.addEventListener("mousedown", (e) => {
    if (!S.img) return;
    if (e.button === 1 || (e.button === 0 && S.spaceDown)) { // pan: middle button, or Space held
      e.preventDefault(); S.pan = { x: e.clientX, y: e.clientY }; st.classList.add("panning"); return;
    }
    if (e.target !== cv || !imageLoaded() || savingHere()) return; // (the picture may still be the last image's)
    const p = toImage(e);
    if (e.button === 0 && (e.altKey || e.ctrlKey || e.metaKey)) { selectAt(p); return; }
    const erase = e.button === 2 || e.shiftKey;
    if (S.mode === "brush") { strokeStart(); paint(p.x, p.y, erase); S.drag = { brush: true, erase, last: p }; draw(); return; }
    S.drag = { x0: p.x, y0: p.y, moved: false, button: e.button, shift: e.shiftKey, box: null };
  });
  window.addEventListener("mousemove", (e) => {
    if (S.pan) { panBy(e.clientX - S.pan.x, e.clientY - S.pan.y); S.pan = { x: e.clientX, y: e.clientY }; return; }
    if (S.mode === "brush" && S.img) { // the brush's outline follows the pointer over the image
      const over = e.target === cv; const p = over ? toImage(e) : null;
      if (over || S.hover) { S.hover = p; if (!S.drag) scheduleDraw(); }
    }
    if (!S.drag) return; const p = toImage(e);
    if (S.drag.brush) { strokeTo(p); scheduleDraw(); return; }
    const tol = 5 / S.view.zoom; // a drag is a box once it moved 5 screen pixels, at any zoom
    if (Math.abs(p.x - S.drag.x0) > tol || Math.abs(p.y - S.drag.y0) > tol) S.drag.moved = true;
    if (S.drag.moved) { S.drag.box = [Math.min(S.drag.x0, p.x), Math.min(S.drag.y0, p.y), Math.max(S.drag.x0, p.x), Math.max(S.drag.y0, p.y)]; scheduleDraw(); }
  });
  window.addEventListener("mouseup", async (e) => {
    if (S.pan) { S.pan = null; st.classList.remove("panning"); return; }
    const d = S.drag; S.drag = null; if (!d) return;
    if (d.brush) { strokeEnd(); draw(); return; }
    if (!imageLoaded()) return;
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    try {
      if (d.moved && d.box) await addPrompt({ box: [clamp(d.box[0], S.W), clamp(d.box[1], S.H), clamp(d.box[2], S.W), clamp(d.box[3], S.H)] });
      else await addPrompt({ x: clamp(d.x0, S.W - 1), y: clamp(d.y0, S.H - 1), label: d.button === 2 || d.shift ? 0 : 1 });
    } catch (err) { setStatus(`decode failed: ${err.message}`, true); }
  });
  st.addEventListener("wheel", (e) => { // zoom about the pointer (a trackpad's pinch comes as Ctrl+wheel: the same)
    if (!S.img) return;
    e.preventDefault();
    const dy = e.deltaMode === 1 ? 33 * e.deltaY : e.deltaMode === 2 ? 800 * e.deltaY : e.deltaY;
    const [sx, sy] = stagePoint(e); zoomAt(Math.pow(1.2, -dy / 100), sx, sy);
  }, { passive: false });
  // The stage changes size with the window (and the narrow layout): a fitted image is fitted again.
  new ResizeObserver(() => { if (!S.W) return; if (S.view.fit) fitView(); else { clampPan(); layoutView(); } draw(); }).observe(st);
  $("zoom-in").onclick = () => zoomKey(1.25); $("zoom-out").onclick = () => zoomKey(0.8);
  $("zoom-fit").onclick = () => { fitView(); draw(); };
}

function setMode(m) {
  S.mode = m; $("mode-prompt").classList.toggle("active", m === "prompt"); $("mode-brush").classList.toggle("active", m === "brush");
  if (S.img) scheduleDraw(); // (the brush's outline)
}

function bindKeys() {
  document.addEventListener("keydown", (e) => {
    const tag = e.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") {
      // Enter in a form's field submits it (sign-in, text prompt); elsewhere (the label box) it leaves the field.
      if (e.key === "Escape" || (e.key === "Enter" && !e.target.form)) e.target.blur();
      return;
    }
    // the focused control's own action only (a button, the Keyboard box's summary, a link)
    if ((tag === "BUTTON" || tag === "SUMMARY" || tag === "A") && (e.key === "Enter" || e.key === " ")) return;
    if (!$("login").hidden) return; // no shortcuts behind the sign-in box
    if (e.key === " ") { // held: the left button pans
      e.preventDefault(); if (!S.spaceDown) { S.spaceDown = true; $("stage").classList.add("space"); } return;
    }
    const k = e.key.toLowerCase();
    if ((e.ctrlKey || e.metaKey) && ((k === "z" && e.shiftKey) || k === "y")) { e.preventDefault(); redo(); return; }
    if ((e.ctrlKey || e.metaKey) && k === "z") { e.preventDefault(); undo(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const once = ["enter", "a", "y", "x", "f", "delete", "r", "e"].includes(k);
    if (e.repeat && once) { e.preventDefault(); return; } // a held key saves, reviews or asks once
    const actions = {
      enter: accept, a: accept, u: undo, escape: clearUndoably, b: () => setMode(S.mode === "brush" ? "prompt" : "brush"),
      // radius in image pixels, down to 0.5 (one pixel: for small images, zoomed in)
      "[": () => setBrush(S.brush > 2 ? S.brush - 2 : S.brush > 1 ? 1 : 0.5),
      "]": () => setBrush(S.brush < 1 ? 1 : S.brush < 2 ? 2 : Math.min(200, S.brush + 2)),
      "+": () => zoomKey(1.25), "=": () => zoomKey(1.25), "-": () => zoomKey(0.8), 0: () => { fitView(); draw(); },
      e: editKey,
      n: () => navigate(1), arrowright: () => navigate(1), p: () => navigate(-1), arrowleft: () => navigate(-1),
      1: () => choose(0), 2: () => choose(1), 3: () => choose(2), f: prefill,
      l: () => { $("label").focus(); $("label").select(); },
      t: () => { if ($("text-prompt").disabled) { setStatus($("text-form").title, true); return; } $("text-prompt").focus(); $("text-prompt").select(); },
      delete: () => deleteKey(false), backspace: () => deleteKey(true),
      y: () => { const id = nextPendingId(); if (id != null) review(id, "accept"); },
      x: () => { const id = nextPendingId(); if (id != null) review(id, "reject"); },
      r: retryImage,
    };
    if (actions[k]) { e.preventDefault(); actions[k](); }
  });
  const spaceUp = () => { S.spaceDown = false; $("stage").classList.remove("space"); };
  document.addEventListener("keyup", (e) => { if (e.key === " ") spaceUp(); });
  window.addEventListener("blur", spaceUp);
}

function setBrush(r) { S.brush = r; $("brush-size").textContent = `r=${r}`; if (S.mode === "brush") scheduleDraw(); }

// ---------------------------------------------------------------------------------------- start
function showLogin(msg) { $("login").hidden = false; $("login-error").textContent = msg || ""; $("token").focus(); }

function setMe(who) {
  S.me = who; $("who").textContent = `${who.name} (${who.role})`; document.body.dataset.role = who.role;
  $("project-group").hidden = !hasRole("admin"); // the server refuses PATCH /api/project to anyone else
  if (S.project) showProject();
}

// ------------------------------------------------------------------------------------- project
// Admins set the project's stage and labels here (PATCH /api/project); the page then uses them at once:
// the label choices are replaced, and switching to semi pre-fills the open image like opening it would.
function showProject() {
  $("project-stage").value = S.project.stage; $("project-labels").value = (S.project.labels || []).join(", ");
}
async function saveProject(e) {
  e.preventDefault();
  const labels = [...new Set($("project-labels").value.split(",").map((t) => t.trim()).filter(Boolean))];
  const wasStage = S.project.stage; const btn = $("project-save"); btn.disabled = true;
  try {
    S.project = await (await api("/api/project", { method: "PATCH", json: { stage: $("project-stage").value, labels } })).json();
  } catch (err) { setStatus(`project not saved: ${err.message}`, true); return; }
  finally { btn.disabled = false; }
  showProject(); setLabels(S.project.labels);
  setStatus(`project saved: stage ${S.project.stage}, ${S.project.labels.length} labels`, true);
  if (S.project.stage === "semi" && wasStage !== "semi" && current() && S.img && !S.pending.length) prefill();
}

// Admins add images from their disk (POST /api/images, one file per request so one bad file refuses only
// itself). The list is then fetched again; a project that had none opens its first image.
async function uploadImages(files) {
  const input = $("project-upload"); input.disabled = true;
  let added = 0, skipped = 0; const refused = [];
  try {
    for (const [i, file] of [...files].entries()) {
      setStatus(`uploading ${i + 1}/${files.length}: ${file.name}`, false);
      const form = new FormData(); form.append("file", file, file.name);
      try {
        const got = await (await api("/api/images", { method: "POST", body: form })).json();
        if (got.length) added += got.length; else skipped++;
      } catch (err) {
        if (err.status === 401) return; // the sign-in box is up; the same files can be chosen again after it
        refused.push(`${file.name} (${err.message})`);
      }
    }
  } finally { input.disabled = false; input.value = ""; }
  const wasEmpty = !S.images.length;
  try { S.images = await (await api("/api/images")).json(); } catch (err) {
    setStatus(`added ${added} image${added === 1 ? "" : "s"}, but the image list could not be fetched again: ${err.message}; reload the page`, true);
    return;
  }
  const parts = [`added ${added} image${added === 1 ? "" : "s"}`];
  if (skipped) parts.push(`${skipped} already in the project`);
  if (refused.length) parts.push(`refused: ${refused.join("; ")}`);
  setStatus(parts.join(", "), true);
  if (wasEmpty && S.images.length) await openImageAndDecoder(0); else renderLists();
}

async function openImageAndDecoder(idx) {
  const ortReady = S.ortReady = S.model ? initOrt() : Promise.resolve();
  await Promise.all([openImage(Math.min(Math.max(idx, 0), S.images.length - 1)), ortReady]);
  document.body.dataset.decoder = S.session ? "onnx" : "server";
}

async function start() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { localStorage.setItem("segany.token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname + location.search); }
  S.token = localStorage.getItem("segany.token");
  if (!S.token) { showLogin(); return; }
  let me;
  try { me = await (await api("/api/me")).json(); } catch (e) { startFailed("could not sign in", e); return; }
  $("login").hidden = true;
  S.project = me.project; $("project-name").textContent = me.project.name; setMe(me.annotator);
  setLabels(me.project.labels);
  if (me.project.labels && me.project.labels.length) $("label").value = me.project.labels[0];
  try { S.model = await (await api("/api/model")).json(); } catch (e) {
    S.model = null; setStatus(e.status === 503 ? "no model on the server" : `no model: ${e.message}`);
  }
  setTextPrompts(Boolean(S.model && S.model.text));
  try { S.images = await (await api("/api/images")).json(); } catch (e) { startFailed("could not list the project's images", e); return; }
  if (!S.images.length) {
    setStatus(hasRole("admin") ? "this project has no images: add some with Add images (Project box) or `segany project add-images`"
      : "this project has no images yet: an admin adds them (`segany project add-images`)", true);
    return;
  }
  const q = new URLSearchParams(location.search);
  const want = q.has("image") ? S.images.findIndex((im) => String(im.id) === q.get("image")) : Number(localStorage.getItem("segany.idx") || 0);
  await openImageAndDecoder(want);
}

// A start that failed other than by a rejected token (then the sign-in box says so): the server is down, or
// answered an error. Said in the status bar and, when it is open, the sign-in box; reloading the page retries.
function startFailed(what, e) {
  if (e.status === 401) return;
  const msg = `${what}: ${e.status ? e.message : `the server did not answer (${e.message})`}; reload the page to try again`;
  setStatus(msg, false);
  if (!$("login").hidden) $("login-error").textContent = msg;
}

// Signing in again after the token was rejected (expired, revoked) keeps the page as it is: the unsaved mask,
// the image and its lists stay, and the failed action can simply be repeated. Only a first sign-in loads all.
async function signIn(e) {
  e.preventDefault();
  const tok = $("token").value.trim(); localStorage.setItem("segany.token", tok);
  if (!S.project) { start(); return; }
  S.token = tok;
  let me;
  try { me = await (await api("/api/me")).json(); } catch (err) { // a 401: the sign-in box stays, with its message
    if (err.status !== 401) $("login-error").textContent = `sign-in failed: ${err.status ? err.message : `the server did not answer (${err.message})`}`;
    return;
  }
  $("login").hidden = true; $("token").value = "";
  setMe(me.annotator); renderLists(); // another person may have signed in: their role decides the controls
  setStatus(hasUnsaved() ? "signed in again: your unsaved mask is still here (Enter saves it)" : "signed in again", true);
  // An image that was opening when the token was rejected did not load (its picture may still be the last
  // image's): it is opened again, and clicks wait for it.
  if (!imageLoaded() && S.images.length) openImage(S.idx);
}
$("login-form").addEventListener("submit", signIn);
$("project-form").addEventListener("submit", (e) => { saveProject(e); document.activeElement.blur(); });
$("project-upload").addEventListener("change", (e) => { if (e.target.files.length) uploadImages(e.target.files); });
$("prev").onclick = () => navigate(-1); $("next").onclick = () => navigate(1);
// (a save on its way would be cut off by leaving the page too)
window.addEventListener("beforeunload", (e) => { if (hasUnsaved() || S.saves.length) { e.preventDefault(); e.returnValue = ""; } });
$("retry").onclick = retryImage; $("notice").onclick = () => { $("notice").hidden = true; };
$("accept").onclick = accept; $("undo").onclick = undo; $("redo").onclick = redo; $("clear").onclick = clearUndoably; $("prefill").onclick = prefill;
$("mode-prompt").onclick = () => setMode("prompt"); $("mode-brush").onclick = () => setMode("brush");
$("text-form").addEventListener("submit", (e) => { proposeText(e); $("text-prompt").blur(); });
$("label").addEventListener("input", () => { if (S.pending.length) renderLists(); }); // rows show the label Y applies
bindCanvas(); bindKeys(); start();
