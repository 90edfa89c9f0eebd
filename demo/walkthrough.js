// The Walkthrough: gr.HTML's js_on_load (in scope: element, trigger, props, watch). props.value is
// one image's payload (vit_core.walkthrough.walkthrough_payload, plus "key", "k", "rgb",
// "whatif_pending" and "whatif_sentences" from demo/walkthrough.py; it comes twice per image, the
// second time with every what-if row); every step is drawn here from it on canvases, with no server
// round-trip, except the patches removed by hand (trigger('whatif') -> props.manual). The trust
// figures of the decision's map arrive later as props.trust.
const S = { step: 0, free: false, patch: null, k: 0, toggled: new Set(), head: null, img: null, rgb: null, drawn: 0 };
const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
  '#bcbd22', '#17becf', '#393b79', '#637939', '#8c6d31', '#843c39', '#7b4173', '#3182bd'];
const HEAT = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]];  // plasma-like
const pct = x => `${(100 * x).toFixed(0)} %`;
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; };
const payload = () => props.value && typeof props.value === 'object' ? props.value : null;
const classColour = c => PALETTE[c % PALETTE.length];
const argmax = a => a.reduce((best, x, i) => x > a[best] ? i : best, 0);
const bold = s => s.replace(/\*\*(.+?)\*\*/g, '<b>$1</b>').replace(/`/g, '');

function heat(v, alpha = 1) {  // 0..1 -> a colour of the map
  const x = Math.min(1, Math.max(0, v)) * (HEAT.length - 1), i = Math.min(HEAT.length - 2, Math.floor(x)), f = x - i;
  const c = HEAT[i].map((a, j) => Math.round(a + f * (HEAT[i + 1][j] - a)));
  return `rgba(${c[0]},${c[1]},${c[2]},${alpha})`;
}
function canvas(parent, w, h, caption) {
  const fig = el('figure', 'wt-fig'), c = el('canvas');
  c.width = w; c.height = h; fig.appendChild(c);
  if (caption) fig.appendChild(el('figcaption', null, caption)).style.maxWidth = `${Math.max(w, 150)}px`;
  parent.appendChild(fig);
  const ctx = c.getContext('2d'); ctx.imageSmoothingEnabled = false;
  return ctx;
}
function cellAt(ctx, p, ev) {  // the patch under a click on a picture drawn by picture()
  const r = ctx.canvas.getBoundingClientRect(), [gh, gw] = p.grid;
  const col = Math.floor((ev.clientX - r.left) / r.width * gw), row = Math.floor((ev.clientY - r.top) / r.height * gh);
  return row >= 0 && row < gh && col >= 0 && col < gw ? row * gw + col : null;
}
// The model's view with, per patch, an optional colour over it and an optional outline.
function picture(ctx, p, { fill = null, numbers = false, outline = null, image = true } = {}) {
  const side = ctx.canvas.width, [gh, gw] = p.grid, cw = side / gw, ch = side / gh;
  ctx.clearRect(0, 0, side, side);
  if (image) ctx.drawImage(S.img, 0, 0, side, side);
  for (let i = 0; i < gh * gw; i++) {
    const x = (i % gw) * cw, y = Math.floor(i / gw) * ch, f = fill && fill(i);
    if (f) { ctx.fillStyle = f; ctx.fillRect(x, y, cw, ch); }
    if (numbers) { ctx.fillStyle = '#fff'; ctx.strokeStyle = '#000'; ctx.lineWidth = 2; ctx.font = `${Math.max(8, cw / 3.2)}px sans-serif`;
      ctx.strokeText(i, x + 2, y + cw / 3 + 2); ctx.fillText(i, x + 2, y + cw / 3 + 2); }
    if (outline && outline(i)) { ctx.strokeStyle = outline(i); ctx.lineWidth = 3; ctx.strokeRect(x + 1.5, y + 1.5, cw - 3, ch - 3); }
  }
  if (numbers) { ctx.strokeStyle = 'rgba(255,255,255,0.9)'; ctx.lineWidth = 1;
    for (let c = 1; c < gw; c++) { ctx.beginPath(); ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, side); ctx.stroke(); }
    for (let r = 1; r < gh; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch); ctx.lineTo(side, r * ch); ctx.stroke(); } }
}
// Lines over x = 0..n-1: series [{values, colour, label}], y in 0..1; `mark` draws a vertical line.
function lineChart(ctx, series, { xLabel = '', xTicks = [], mark = null, upto = null } = {}) {
  const W = ctx.canvas.width, H = ctx.canvas.height, L = 34, B = 30, T = 8, R = 100, n = series[0].values.length;
  const X = i => L + (W - L - R) * (n === 1 ? 0.5 : i / (n - 1)), Y = v => T + (H - T - B) * (1 - v);
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, H); ctx.font = '11px sans-serif'; ctx.fillStyle = '#444';
  ctx.strokeStyle = '#ccc'; ctx.lineWidth = 1;
  for (const v of [0, 0.5, 1]) { ctx.beginPath(); ctx.moveTo(L, Y(v)); ctx.lineTo(W - R, Y(v)); ctx.stroke(); ctx.fillText(pct(v), 0, Y(v) + 4); }
  xTicks.forEach(([i, t]) => ctx.fillText(t, X(i) - 4, H - B + 14));
  ctx.fillText(xLabel, L + (W - L - R) / 2 - 30, H - 3);
  if (mark != null) { ctx.strokeStyle = '#999'; ctx.setLineDash([4, 3]); ctx.beginPath(); ctx.moveTo(X(mark), T); ctx.lineTo(X(mark), H - B); ctx.stroke(); ctx.setLineDash([]); }
  series.forEach(({ values, colour, label }, s) => {
    const last = upto == null ? n - 1 : upto;
    for (const [from, to, alpha] of [[0, n - 1, 0.2], [0, last, 1]]) {
      ctx.globalAlpha = alpha; ctx.strokeStyle = colour; ctx.lineWidth = 2.5; ctx.beginPath();
      for (let i = from; i <= to; i++) (i === from ? ctx.moveTo : ctx.lineTo).call(ctx, X(i), Y(values[i]));
      ctx.stroke();
    }
    ctx.globalAlpha = 1; ctx.fillStyle = colour; ctx.fillText(`${label} ${pct(values[mark == null ? last : mark])}`, W - R + 6, 14 + 15 * s);
  });
}
function bars(ctx, probs, classes, { top = 10, highlight = null } = {}) {  // the top classes, largest first
  const order = probs.map((p, i) => i).sort((a, b) => probs[b] - probs[a]).slice(0, top);
  const W = ctx.canvas.width, row = ctx.canvas.height / order.length, left = 90;
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, W, ctx.canvas.height); ctx.font = '12px sans-serif';
  order.forEach((c, r) => {
    ctx.fillStyle = c === highlight ? classColour(c) : '#9ab';
    ctx.fillRect(left, r * row + 3, Math.max(1, (W - left - 50) * probs[c]), row - 6);
    ctx.fillStyle = '#222'; ctx.fillText(classes[c].slice(0, 12), 2, r * row + row / 2 + 4);
    ctx.fillText(pct(probs[c]), left + 4 + (W - left - 50) * probs[c], r * row + row / 2 + 4);
  });
}
function legend(parent, classes, used) {
  const box = el('div', 'wt-legend');
  [...used].forEach(c => { const s = el('span', null, classes[c]); s.style.borderLeft = `12px solid ${classColour(c)}`; box.appendChild(s); });
  parent.appendChild(box);
}

// ------------------------------------------------------------------------------------------------
// The steps: each draws its figure into `fig` from the payload `p`
function drawPixels(fig, p) {
  picture(canvas(fig, 300, 300, `what the model sees: ${p.image_size}×${p.image_size} px`), p);
  picture(canvas(fig, 300, 300, `${p.grid[0]}×${p.grid[1]} patches of ${p.patch_size}×${p.patch_size} px, numbered row by row`), p, { numbers: true });
}
function patchNumbers(i, p) {  // patch i's pixels, flattened the way the embedding reads them (row, column, channel)
  const P = p.patch_size, gw = p.grid[1], x0 = (i % gw) * P, y0 = Math.floor(i / gw) * P, out = [];
  for (let y = 0; y < P; y++) for (let x = 0; x < P; x++) for (let c = 0; c < 3; c++) out.push(S.rgb[((y0 + y) * p.image_size + x0 + x) * 4 + c]);
  return out;
}
function drawTokens(fig, p) {
  const i = S.patch, P = p.patch_size, nums = patchNumbers(i, p), cols = 3 * P, cell = Math.max(4, Math.min(20, Math.floor(300 / cols)));
  const pick = canvas(fig, 200, 200, 'click a patch');
  picture(pick, p, { outline: j => j === i ? '#ff0' : null });
  pick.canvas.onclick = ev => { const j = cellAt(pick, p, ev); if (j != null) { S.patch = j; render(); } };
  const zoom = canvas(fig, 120, 120, `patch ${i}: ${P}×${P} pixels`), gw = p.grid[1];
  zoom.drawImage(S.img, (i % gw) * P, Math.floor(i / gw) * P, P, P, 0, 0, 120, 120);
  const flat = canvas(fig, cell * cols, cell * P, `flattened: ${p.patch_dim} numbers, one row of R, G, B per pixel row`);
  nums.forEach((v, j) => { const c = j % 3; flat.fillStyle = `rgb(${c === 0 ? v : 0},${c === 1 ? v : 0},${c === 2 ? v : 0})`;
    flat.fillRect((j % cols) * cell, Math.floor(j / cols) * cell, cell - 1, cell - 1); });
  const pca = canvas(fig, 200, 200, `each patch's ${p.embed_dim}-number token, as colour (3-component PCA)`);
  picture(pca, p, { image: false, fill: j => `rgb(${p.token_pca[j].map(v => Math.round(255 * v)).join(',')})`, outline: j => j === i ? '#ff0' : null });
}
function drawPosition(fig, p) {
  if (!p.position_similarity) { fig.appendChild(el('p', 'wt-note', 'This model has no position embedding of its own to show.')); return; }
  const sim = p.position_similarity[S.patch], lo = Math.min(...sim), hi = Math.max(...sim);
  const c = canvas(fig, 260, 260, `position embedding of patch ${S.patch}: its similarity to every position (click another)`);
  picture(c, p, { image: false, fill: j => heat((sim[j] - lo) / (hi - lo || 1)), outline: j => j === S.patch ? '#0f0' : null });
  c.canvas.onclick = ev => { const j = cellAt(c, p, ev); if (j != null) { S.patch = j; render(); } };
  picture(canvas(fig, 260, 260, 'the picture, for reference'), p, { outline: j => j === S.patch ? '#0f0' : null });
}
function drawCls(fig, p) {  // a model that reads the mean of its patch tokens has no CLS token to put in front
  const T = p.grid[0] * p.grid[1], cls = p.reads.includes('CLS') ? 1 : 0, w = Math.min(14, Math.floor(880 / (T + 1)));
  const ctx = canvas(fig, w * (T + cls) + 4, 60, cls ? `the sequence the blocks read: CLS, then ${T} patch tokens (${T + 1} tokens of ${p.embed_dim} numbers)`
    : `the sequence the blocks read: ${T} patch tokens of ${p.embed_dim} numbers; the prediction reads ${p.reads}`);
  for (let j = 0; j < T; j++) { ctx.fillStyle = `rgb(${p.token_pca[j].map(v => Math.round(255 * v)).join(',')})`; ctx.fillRect((j + cls) * w + 2, 10, w - 1, 30); }
  if (cls) { ctx.fillStyle = '#222'; ctx.fillRect(0, 10, w, 30); ctx.font = '11px sans-serif'; ctx.fillText('CLS', 0, 55); }
}
function drawBlock(fig, p, l) {
  const att = p.cls_attention[l], H = att.length, T = att[0].length;
  const mean = Array.from({ length: T }, (_, j) => att.reduce((s, h) => s + h[j], 0) / H), top = Math.max(...mean);
  picture(canvas(fig, 190, 190, `block ${l + 1}: where ${p.reads} attends (mean of ${H} heads)`), p, { fill: j => heat(mean[j] / top, 0.6) });
  const heads = el('div', 'wt-heads'); fig.appendChild(heads);
  att.forEach((h, k) => { const hmax = Math.max(...h); picture(canvas(heads, 58, 58, `head ${k + 1}`), p, { fill: j => heat(h[j] / hmax, 0.65) }); });
  if (!p.lens) { fig.appendChild(el('p', 'wt-note', p.lens_note || 'No logit lens for this model.')); return; }
  const pred = p.predicted, cls = p.lens.cls, shown = classesOfLens(p);
  lineChart(canvas(fig, 290, 190, `logit lens: ${p.reads} after each block → class probabilities`),
    shown.map(c => ({ values: cls.map(row => row[c]), colour: classColour(c), label: p.classes[c].slice(0, 10) })),
    { xLabel: 'after block', xTicks: cls.map((_, i) => [i, String(i + 1)]), mark: l, upto: l });
  const tops = p.lens.patch_top[l], probs = p.lens.patch_top_prob[l], pair = el('div', 'wt-pair'); fig.appendChild(pair);
  picture(canvas(pair, 160, 160, `each patch token's top class after block ${l + 1} (paler: less sure)`), p,
    { image: false, fill: j => classColour(tops[j]) + Math.round(64 + 191 * probs[j]).toString(16).padStart(2, '0'), outline: () => null });
  legend(pair, p.classes, new Set([pred, ...tops]));
}
function classesOfLens(p) {  // the predicted class and the two others the lens rates highest at any block
  const best = p.classes.map((_, c) => Math.max(...p.lens.cls.map(row => row[c])));
  return [p.predicted, ...best.map((v, c) => [v, c]).filter(([, c]) => c !== p.predicted).sort((a, b) => b[0] - a[0]).slice(0, 2).map(([, c]) => c)];
}
function drawHeads(fig, p) {
  const ko = p.knockout, L = ko.prob.length, H = ko.prob[0].length, base = p.probs[p.predicted], cell = Math.min(44, Math.floor(300 / Math.max(L, H)));
  const drops = ko.prob.map(row => row.map(q => base - q)), worst = Math.max(1e-6, ...drops.flat());
  const ctx = canvas(fig, 40 + H * cell, 20 + L * cell, `change in ${p.classes[p.predicted]} (percentage points) with one head knocked out; rows: blocks, columns: heads`);
  ctx.font = '11px sans-serif';
  drops.forEach((row, l) => row.forEach((d, h) => {
    ctx.fillStyle = heat(Math.max(0, d) / worst); ctx.fillRect(40 + h * cell, 20 + l * cell, cell - 2, cell - 2);
    if (Math.abs(d) >= 0.01) { ctx.fillStyle = d / worst > 0.6 ? '#000' : '#fff'; ctx.fillText(`${d > 0 ? '−' : '+'}${Math.abs(100 * d).toFixed(0)}`, 44 + h * cell, 20 + l * cell + cell / 2 + 4); }
    if (S.head && S.head[0] === l && S.head[1] === h) { ctx.strokeStyle = '#0f0'; ctx.lineWidth = 3; ctx.strokeRect(41 + h * cell, 21 + l * cell, cell - 4, cell - 4); }
  }));
  ctx.fillStyle = '#222'; for (let l = 0; l < L; l++) ctx.fillText(`B${l + 1}`, 4, 20 + l * cell + cell / 2 + 4);
  for (let h = 0; h < H; h++) ctx.fillText(`h${h + 1}`, 40 + h * cell + cell / 2 - 8, 14);
  ctx.canvas.onclick = ev => { const r = ctx.canvas.getBoundingClientRect(), sx = ctx.canvas.width / r.width;
    const h = Math.floor(((ev.clientX - r.left) * sx - 40) / cell), l = Math.floor(((ev.clientY - r.top) * sx - 20) / cell);
    if (l >= 0 && l < L && h >= 0 && h < H) { S.head = [l, h]; render(); } };
  const info = el('p', 'wt-info');
  if (S.head) { const [l, h] = S.head;
    info.textContent = `Block ${l + 1}, head ${h + 1} off: the model says ${p.classes[ko.top[l][h]]} at ${pct(ko.top_prob[l][h])}; ` +
      `${p.classes[p.predicted]} ${pct(base)} → ${pct(ko.prob[l][h])}.`;
  } else info.textContent = 'Click a cell to see the prediction with that head off.';
  fig.appendChild(info);
}
function drawDecision(fig, p) {
  bars(canvas(fig, 300, 220, `final probabilities (top ${Math.min(10, p.classes.length)})`), p.probs, p.classes, { highlight: p.predicted });
  if (p.map) { const v = p.map.values, hi = Math.max(...v) || 1;
    picture(canvas(fig, 220, 220, `where it looked: ${p.map.label}`), p, { fill: j => heat(v[j] / hi, 0.6) }); }
  const t = props.trust, info = el('p', 'wt-info');
  if (t && t.key === p.key) info.innerHTML = 'Trust on this image: ' + bold(t.sentence) + '.'; else info.textContent = p.map ? 'Measuring how far to trust this map on this image…' : '';
  fig.appendChild(info);
}
function removedSet(order, k) { return new Set(order.slice(0, k)); }
function drawWhatIf(fig, p) {
  const w = p.whatif, ks = w.ks, r = ks.indexOf(S.k), pred = p.predicted, name = p.classes[pred];
  const row = el('div', 'wt-row'), slider = el('input'); fig.appendChild(row);  // the slider moves along the rows' k
  Object.assign(slider, { type: 'range', min: 0, max: ks.length - 1, step: 1, value: r, className: 'wt-k', disabled: p.whatif_pending });
  const label = el('span', null, `k = ${S.k} patches removed (${w.removal})` + (p.whatif_pending ? '; the other k are on their way…' : ''));
  slider.oninput = () => { S.k = ks[+slider.value]; S.toggled.clear(); render(); };
  row.append(slider, label);
  const hidden = s => j => s.has(j) ? 'rgba(128,128,128,0.93)' : null;
  const side = (probs, s, caption) => { const q = probs[r], top = argmax(q);
    const says = `${p.classes[top]} ${pct(q[top])}` + (top === pred ? '' : ` · ${name} ${pct(q[pred])}`);
    picture(canvas(fig, 190, 190, `${caption}: ${says}`), p, { fill: hidden(s) }); };
  side(w.relevant, removedSet(w.order, S.k), `${S.k} most relevant removed`);
  side(w.random, removedSet(w.random_order, S.k), `${S.k} random removed`);
  const byHand = new Set(removedSet(w.order, S.k)); S.toggled.forEach(j => byHand.has(j) ? byHand.delete(j) : byHand.add(j));
  const m = props.manual, mine = m && m.key === p.key && m.k === S.k && sameSet(m.toggled, S.toggled);
  const hand = canvas(fig, 190, 190, S.toggled.size === 0 ? 'click patches to remove or restore them' : mine ? m.caption : 'asking the model…');
  picture(hand, p, { fill: hidden(byHand), outline: j => S.toggled.has(j) ? '#0f0' : null });
  hand.canvas.onclick = ev => { const j = cellAt(hand, p, ev); if (j == null) return;
    S.toggled.has(j) ? S.toggled.delete(j) : S.toggled.add(j); render();
    if (S.toggled.size) trigger('whatif', { key: p.key, k: S.k, toggled: [...S.toggled] }); };
  lineChart(canvas(fig, 330, 190, `${name} as patches are removed`),
    [{ values: w.relevant.map(q => q[pred]), colour: '#d62728', label: 'relevant' }, { values: w.random.map(q => q[pred]), colour: '#7f7f7f', label: 'random' }],
    { xLabel: 'patches removed (k)', xTicks: [[0, '0'], [ks.length - 1, String(ks[ks.length - 1])]], mark: r });
}
const sameSet = (a, b) => a.length === b.size && a.every(x => b.has(x));

function steps(p) {
  const L = p.layers, list = [
    { id: 'pixels', title: 'Pixels to patches', draw: drawPixels },
    { id: 'tokens', title: 'Patches to tokens', draw: drawTokens },
    { id: 'position', title: 'Where each patch sits: the position embedding', draw: drawPosition },
    { id: 'cls', title: p.reads.includes('CLS') ? 'The CLS token goes in front' : 'The sequence the blocks read', draw: drawCls }];
  for (let l = 0; l < L; l++) list.push({ id: `block${l + 1}`, title: `Block ${l + 1} of ${L}: where it looks, and what it would say now`, draw: (f, q) => drawBlock(f, q, l) });
  list.push({ id: 'heads', title: 'Which heads matter for this image', draw: drawHeads },
    { id: 'decision', title: 'The decision, and where it looked', draw: drawDecision });
  if (p.whatif) list.push({ id: 'whatif', title: 'What if these patches were not there?', draw: drawWhatIf });
  return list;
}
function narration(p, id) {
  if (id === 'whatif' && p.whatif_sentences) return p.whatif_sentences[p.whatif.ks.indexOf(S.k)];
  return (p.narration || {})[id] || '';
}

// ------------------------------------------------------------------------------------------------
// Layout, stepping and keys
const CSS = `
.wt { font-size: 15px; color: var(--body-text-color); }
.wt-bar { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; padding: 2px 0 6px; }
.wt-bar button { padding: 5px 14px; border-radius: 6px; border: 1px solid var(--border-color-primary);
  background: var(--button-secondary-background-fill); color: var(--body-text-color); cursor: pointer; font-size: 15px; }
.wt-count { font-weight: 600; min-width: 7.5em; text-align: center; }
.wt-mode { margin-left: auto; font-size: 13px; }
.wt-step { border-top: 1px solid var(--border-color-primary); padding-top: 4px; }
.wt-step h3 { margin: 2px 0; font-size: 1.2em; }
.wt-narration { font-size: 1.1em; margin: 0 0 8px; min-height: 1.3em; }
.wt-figure { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: flex-start; }
.wt-fig { margin: 0; display: flex; flex-direction: column; align-items: center; max-width: 100%; }
.wt-fig canvas { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; }
.wt-fig figcaption { font-size: 12px; color: #555; text-align: center; }
.wt-heads { display: grid; grid-template-columns: repeat(3, auto); gap: 0 6px; }
.wt-heads figcaption { font-size: 10px; }
.wt-pair { display: flex; gap: 6px; align-items: flex-start; }
.wt-legend { display: grid; grid-template-columns: auto; gap: 1px; font-size: 11px; }
.wt-legend span { padding-left: 5px; }
.wt-row { flex-basis: 100%; display: flex; gap: 12px; align-items: center; }
.wt-k { width: min(420px, 90%); }
.wt-info, .wt-note { flex-basis: 100%; margin: 0; }
.wt-empty { font-size: 1.1em; padding: 24px 0; }`;
element.innerHTML = `<style>${CSS}</style><div class="wt"><div class="wt-bar"><button class="wt-back" aria-label="previous step">← Back</button>
  <span class="wt-count" aria-live="polite"></span><button class="wt-next" aria-label="next step">Next →</button>
  <label class="wt-mode"><input type="checkbox" class="wt-free"> every step on one page</label></div><div class="wt-steps"></div></div>`;
const box = element.querySelector('.wt-steps'), count = element.querySelector('.wt-count');

function section(p, s, i, n) {
  const sec = el('section', 'wt-step'); sec.dataset.step = s.id;
  sec.appendChild(el('h3', null, `${i + 1}. ${s.title}`));
  sec.appendChild(el('p', 'wt-narration', narration(p, s.id)));
  const fig = el('div', 'wt-figure'); sec.appendChild(fig);
  s.draw(fig, p);
  return sec;
}
function render() {
  const p = payload(); box.replaceChildren();
  if (!p || !S.img) {
    count.textContent = 'No image yet';
    box.appendChild(el('p', 'wt-empty', 'No image yet: upload one or pick an example (here or in the Explorer above), ' +
      "and the walkthrough tells the model's story on it, step by step."));
  } else {
    const list = steps(p); S.step = Math.max(0, Math.min(S.step, list.length - 1));
    count.textContent = S.free ? `${list.length} steps` : `Step ${S.step + 1} of ${list.length}`;
    (S.free ? list : [list[S.step]]).forEach(s => box.appendChild(section(p, s, list.indexOf(s), list.length)));
  }
  // For benchmarks/walkthrough_browser.py: when the drawing was done, and the next frame after it.
  S.drawn += 1; element.dataset.drawn = S.drawn; window.__wtDrawnAt = performance.now();
  requestAnimationFrame(() => { window.__wtFrameAt = performance.now(); });
}
function go(delta) { if (payload()) S.step += delta; render(); }  // before any image: the message again
element.querySelector('.wt-back').onclick = () => go(-1);
element.querySelector('.wt-next').onclick = () => go(1);
element.querySelector('.wt-free').onchange = ev => { S.free = ev.target.checked; render(); };
document.addEventListener('keydown', ev => {
  const r = element.getBoundingClientRect(), seen = element.offsetParent !== null && r.top < innerHeight && r.bottom > 0;
  if (S.free || !seen || ev.altKey || ev.ctrlKey || ev.metaKey) return;  // another tab, scrolled away, or a shortcut
  if (ev.target.closest && ev.target.closest('input, textarea, select, [contenteditable]')) return;  // typing, or a slider
  if (ev.key === 'ArrowRight') { ev.preventDefault(); go(1); } else if (ev.key === 'ArrowLeft') { ev.preventDefault(); go(-1); }
});

function load() {  // a new image: its pixels read once, then the step the audience is on
  const p = payload();
  if (p && p.key !== S.key) window.__wtArrived = { key: p.key, at: performance.now() };  // for the benchmark
  if (p && p.key === S.key && S.img) return render();  // the same image, its what-if curves completed
  S.img = null; S.rgb = null; S.toggled.clear(); S.head = null; S.key = p ? p.key : null;
  if (!p) return render();
  const T = p.grid[0] * p.grid[1];
  S.k = p.k; S.patch = p.map ? argmax(p.map.values) : Math.floor(T / 2);
  const size = p.image_size, c = document.createElement('canvas'), ctx = c.getContext('2d'); c.width = c.height = size;
  const drawn = () => { S.rgb = ctx.getImageData(0, 0, size, size).data; S.img = c; render();
    window.__wtImageDrawn = { key: p.key, at: performance.now() }; };  // a new image's first step drawn
  if (p.rgb) {  // raw bytes: drawn at once (decoding the PNG waits for a busy page's other tasks)
    const bytes = atob(p.rgb), data = ctx.createImageData(size, size);
    for (let i = 0; i < size * size; i++) { for (let ch = 0; ch < 3; ch++) data.data[4 * i + ch] = bytes.charCodeAt(3 * i + ch); data.data[4 * i + 3] = 255; }
    ctx.putImageData(data, 0, 0); return drawn();
  }
  const img = new Image();
  img.onload = () => { ctx.drawImage(img, 0, 0); drawn(); };
  img.src = p.pixels;
}
watch('value', load);
if (props.land || new URLSearchParams(location.search).get('tab') === 'walkthrough')  // a shared link lands here
  setTimeout(() => (document.getElementById('tabs') || element).scrollIntoView({ block: 'start' }), 300);
watch(['trust', 'manual'], () => render());
load();
