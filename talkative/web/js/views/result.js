// The result of the active analysis: summary, colour-by picker, export and link, the token strip with its
// tooltip, the detail panel, the legend and the table. One selection and one metric drive all of them.
import { h, clear, fill } from '../dom.js';
import { duration, exactTime, num, plural } from '../format.js';
import { available, salienceScale, scaleFor } from '../metrics.js';
import { save } from '../prefs.js';
import { createDetail } from './detail.js';
import { createFlagFilter } from './flags.js';
import { createLegend } from './legend.js';
import { createStrip } from './strip.js';
import { createTable } from './table.js';

function mean(rows, key) {
  const values = rows.filter((r) => !r.outlier && Number.isFinite(r[key])).map((r) => r[key]);
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

function welcome() {
  return h(
    'div',
    { class: 'card welcome' },
    h('h2', {}, 'Read what a model’s activations say'),
    h(
      'p',
      {},
      'For every token of a text, a natural language autoencoder turns the model’s internal vector into a short explanation, then rebuilds the vector from that explanation. How well it rebuilds it says how faithful the explanation is.',
    ),
    h('ol', {}, h('li', {}, 'Write a text or a chat, pick a model.'), h('li', {}, 'Press Analyse (Ctrl + Enter).'), h('li', {}, 'Point at a token to read its explanation; colours show how faithful each one is.')),
  );
}

export function createResult({ store, analyses, tooltip, actions }) {
  const root = document.getElementById('result');
  let shown = null; // {runId, result}
  let view = null;

  function source(run) {
    if (run.origin === 'imported') return `from the file ${run.filename}`;
    if (run.origin === 'stored') return `stored ${exactTime(run.createdAt)}`;
    if (run.origin === 'shared') return 'shared with you';
    return '';
  }

  function summaryItems(rows, meta, legend) {
    const s = meta.summary || {};
    return legend.headline.map((m) => {
      const value = s[m.summary_key] ?? mean(rows, m.name);
      if (value === null || value === undefined) return null;
      return h('div', {}, h('dt', {}, `mean ${m.label}`), h('dd', {}, num(value), h('span', { class: 'direction' }, m.better === 'higher' ? ' ↑' : ' ↓')));
    });
  }

  function build(run) {
    const rows = run.result.tokens || [];
    const meta = run.result.metadata || {};
    const legend = store.get('legend');
    const metrics = available(rows, legend.colourable);
    const preferred = store.get('metric');
    const metric = metrics.includes(preferred) ? preferred : metrics[0] || null;
    const salienceMax = salienceScale(rows);

    const metricSelect = h(
      'select',
      { id: 'metric-select', disabled: !metrics.length },
      metrics.length ? metrics.map((k) => h('option', { value: k, selected: k === metric }, `${legend.get(k).label} (${legend.get(k).better} is better)`)) : h('option', {}, 'no metrics'),
    );
    const detail = createDetail({
      legend,
      onMove: (i) => selectRow(i, { focus: false }),
      reexplain: actions.reexplain ? (row, direction, alpha) => actions.reexplain(run, row, direction, alpha) : null,
    });
    const legendView = createLegend(legend);
    const strip = createStrip({ rows, legend, tooltip, onSelect: (i, opts) => selectRow(i, opts) });
    const table = createTable({ rows, legend, onSelect: (i, opts) => selectRow(i, opts) });
    const flagFilter = createFlagFilter(rows, () => {
      strip.filter(flagFilter.hides);
      table.filter(flagFilter.hides);
    });

    const facts = [
      meta.model_id || run.modelId,
      meta.layer !== undefined ? `layer ${meta.layer}` : null,
      meta.best_of_k ? `best of ${meta.best_of_k}` : null,
      meta.temperature !== undefined ? `temperature ${meta.temperature}` : null,
      meta.seed !== undefined ? `seed ${meta.seed}` : null,
      plural(rows.length, 'token'),
      meta.processing_time ? `${duration(meta.processing_time)}` : null,
      source(run),
    ].filter(Boolean);

    const buttons = h(
      'div',
      { class: 'toolbar-actions' },
      h('button', { type: 'button', class: 'secondary small', id: 'export-jsonl', onclick: () => actions.exportJsonl(run) }, 'Export JSONL'),
      h('button', { type: 'button', class: 'secondary small', id: 'export-csv', onclick: () => actions.exportCsv(run) }, 'Export CSV'),
      run.requestId ? h('button', { type: 'button', class: 'secondary small', id: 'copy-link', onclick: () => actions.copyLink(run) }, 'Copy link') : null,
      run.requestId && actions.share ? h('button', { type: 'button', class: 'secondary small', id: 'share-token', onclick: () => actions.share(run, rows[view.selected]) }, 'Share this token') : null,
      run.input ? h('button', { type: 'button', class: 'secondary small', onclick: () => actions.editInput(run) }, 'Edit input') : null,
    );

    const card = h(
      'section',
      { class: 'card result-card', 'aria-labelledby': 'result-title' },
      h('div', { class: 'result-head' }, h('h2', { id: 'result-title' }, 'Result'), h('p', { class: 'facts' }, facts.join(' · '))),
      h('dl', { class: 'summary' }, summaryItems(rows, meta, legend)),
      run.share ? h('aside', { class: 'share-note', id: 'share-note' }, h('strong', {}, 'Shared result'), run.share.comment ? h('p', { class: 'share-comment' }, run.share.comment) : null) : null,
      h('div', { class: 'toolbar' }, h('label', { class: 'inline', for: 'metric-select' }, 'Colour by ', metricSelect), buttons),
      flagFilter.element,
      rows.length ? strip.element : h('p', { class: 'hint' }, 'No tokens in this result.'),
      h('p', { class: 'hint strip-hint' }, 'Point at a token or move with the arrow keys to read its explanation.'),
      h('div', { class: 'result-panels' }, detail.element, legendView.element),
    );
    const metaBox = h(
      'details',
      { class: 'card metadata' },
      h('summary', {}, 'Run details'),
      h(
        'dl',
        {},
        Object.entries(meta).map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', { class: 'mono' }, typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v)))),
      ),
    );
    fill(root, card, table.element, metaBox);

    function recolour(name) {
      const scale = name ? scaleFor(rows, legend.get(name)) : null;
      strip.recolour(name, scale, salienceMax);
      table.recolour(name, scale, salienceMax);
      legendView.render({ metric: name, scale, salienceMax, present: available(rows, legend.names) });
      table.select(view?.selected ?? 0);
    }

    function selectRow(i, { focus = false } = {}) {
      view.selected = i;
      strip.select(i, { focus });
      table.select(i);
      detail.show(rows, i, salienceMax);
    }

    metricSelect.addEventListener('change', () => {
      store.set('metric', metricSelect.value);
      save('metric', metricSelect.value);
      recolour(metricSelect.value);
    });

    view = { selected: 0, selectRow };
    recolour(metric);
    const anchored = run.share ? rows.findIndex((r) => run.share.positions.includes(r.position)) : -1;
    if (run.share) strip.anchor(run.share.positions);
    if (rows.length) selectRow(Math.max(0, anchored), { focus: anchored >= 0 });
    else detail.show(rows, -1, salienceMax);
  }

  function render() {
    const run = analyses.active();
    if (!run) {
      shown = null;
      tooltip.hide();
      fill(root, welcome());
      return;
    }
    if (!run.result) {
      if (shown) {
        shown = null;
        tooltip.hide();
        clear(root);
      }
      return;
    }
    if (shown && shown.runId === run.id && shown.result === run.result) return;
    shown = { runId: run.id, result: run.result };
    tooltip.hide();
    build(run);
  }

  store.on('activeRun', render);
  store.on('legend', () => {
    shown = null; // the legend arrived (or changed): build the result again with its metrics
    render();
  });
  store.on('runs', (_, run) => (!run || run.id === store.get('activeRun') ? render() : null));
  render();
}
