// The results table: sortable columns (click a header; nulls sort last), columns shown or hidden from a menu
// (remembered), the chosen metric's column coloured, a row click (or its position button) selects the token.
import { h, fill } from '../dom.js';
import { num, shownToken } from '../format.js';
import { badnessColour } from '../metrics.js';
import { load, save } from '../prefs.js';
import { explanationNode, lensChips } from './explanation.js';
import { FLAG_TEXT, flagsOf } from './flags.js';

const LEADING = [
  { key: 'position', label: '#', numeric: true, always: true },
  { key: 'token', label: 'Token', always: true },
  { key: 'explanation', label: 'Explanation', on: true },
];
const TRAILING = [
  { key: 'norm', label: 'Norm', numeric: true },
  { key: 'logit_lens_top', label: 'Logit lens', on: true },
  { key: 'tuned_lens_top', label: 'Tuned lens', on: true },
  { key: 'outlier', label: 'Outlier', on: true },
  { key: 'flags', label: 'Flags', on: true },
];

/** The columns: the row's own fields around one column per metric of the legend (headline metrics shown first). */
function columnsOf(legend) {
  const metrics = legend.metrics.map((m) => ({ key: m.name, label: m.short, numeric: true, on: m.role === 'headline' }));
  return [...LEADING, ...metrics, ...TRAILING];
}

const present = (rows, key) =>
  rows.some((r) => r[key] !== null && r[key] !== undefined && r[key] !== false && !(Array.isArray(r[key]) && !r[key].length));

export function createTable({ rows, legend, onSelect }) {
  const columns = columnsOf(legend).filter((c) => c.always || present(rows, c.key));
  const shown = load('table.columns', null);
  let visible = new Set(columns.filter((c) => c.always || (shown ? shown.includes(c.key) : c.on)).map((c) => c.key));
  let sort = { key: 'position', dir: 1 };
  let metric = null;
  let scale = null;
  let salienceMax = 1;
  let selected = -1;
  let hides = () => false; // the flag filter: rows it leaves out are not listed

  const section = h('section', { class: 'card table-card', 'aria-labelledby': 'table-title' });
  const table = h('table', { class: 'results', 'aria-labelledby': 'table-title' });
  const scroller = h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': 'Results table (scrolls)' }, table);
  const menu = h(
    'details',
    { class: 'column-menu' },
    h('summary', {}, 'Columns'),
    h(
      'fieldset',
      {},
      h('legend', { class: 'sr-only' }, 'Columns to show'),
      columns
        .filter((c) => !c.always)
        .map((c) =>
          h(
            'label',
            {},
            h('input', {
              type: 'checkbox',
              checked: visible.has(c.key),
              'data-column': c.key,
              onchange: (event) => {
                if (event.target.checked) visible.add(c.key);
                else visible.delete(c.key);
                save('table.columns', [...visible]);
                render();
              },
            }),
            ` ${c.label}`,
          ),
        ),
    ),
  );
  section.append(h('div', { class: 'card-head' }, h('h3', { id: 'table-title' }, 'All tokens'), menu), scroller);

  function cell(row, c, i) {
    const v = row[c.key];
    if (c.key === 'token') return h('td', { class: 'mono token-cell' }, shownToken(v));
    if (c.key === 'explanation') return h('td', { class: 'explanation-cell' }, explanationNode(row, salienceMax));
    if (c.key === 'position') {
      return h('td', { class: 'num' }, h('button', { type: 'button', class: 'link', 'aria-label': `Show token ${row.position} in the detail panel`, 'data-row': i }, String(v)));
    }
    if (c.key === 'outlier') return h('td', {}, v ? 'outlier' : '');
    if (c.key === 'flags') return h('td', { class: 'flags-cell' }, flagsOf(row).map((f) => h('span', { class: 'flag', title: FLAG_TEXT[f] || f }, f)));
    if (c.key.endsWith('lens_top')) return h('td', { class: 'lens-cell' }, lensChips(v, 3));
    const colour = c.key === metric && scale && !row.outlier ? badnessColour(scale.badness(v)) : null;
    return h('td', { class: 'num', style: colour ? { backgroundColor: colour } : undefined }, num(v, 4));
  }

  function sorted() {
    const { key, dir } = sort;
    const indexed = rows.map((row, i) => ({ row, i }));
    return indexed.sort((a, b) => {
      const x = a.row[key];
      const y = b.row[key];
      const xNull = x === null || x === undefined;
      const yNull = y === null || y === undefined;
      if (xNull || yNull) return xNull === yNull ? a.i - b.i : xNull ? 1 : -1;
      if (typeof x === 'string') return dir * x.localeCompare(y) || a.i - b.i;
      return dir * (x - y) || a.i - b.i;
    });
  }

  function header(c) {
    const active = sort.key === c.key;
    const direction = active ? (sort.dir > 0 ? 'ascending' : 'descending') : 'none';
    const m = legend.get(c.key);
    const title = m ? `${m.title}: ${m.better} is better` : undefined;
    return h(
      'th',
      { scope: 'col', 'aria-sort': direction, class: c.numeric ? 'num' : '' },
      h(
        'button',
        {
          type: 'button',
          class: 'sort',
          title,
          onclick: () => {
            sort = { key: c.key, dir: active ? -sort.dir : c.numeric && m?.better === 'higher' ? -1 : 1 };
            render();
            table.querySelector(`th[aria-sort="${sort.dir > 0 ? 'ascending' : 'descending'}"] button`)?.focus();
          },
        },
        c.label,
        h('span', { class: 'sort-mark', 'aria-hidden': 'true' }, active ? (sort.dir > 0 ? ' ▲' : ' ▼') : ''),
      ),
    );
  }

  function render() {
    const cols = columns.filter((c) => visible.has(c.key));
    fill(table, 
      h('thead', {}, h('tr', {}, cols.map(header))),
      h(
        'tbody',
        {},
        sorted()
          .filter(({ row }) => !hides(row))
          .map(({ row, i }) =>
          h('tr', { class: `${row.outlier ? 'outlier' : ''}${i === selected ? ' selected' : ''}`, 'data-row': i, 'aria-current': i === selected ? 'true' : undefined }, cols.map((c) => cell(row, c, i))),
        ),
      ),
    );
  }

  table.addEventListener('click', (event) => {
    if (event.target.closest('th')) return;
    const tr = event.target.closest('tr[data-row]');
    if (tr) onSelect(Number(tr.dataset.row), { focus: false });
  });

  return {
    element: section,
    recolour(nextMetric, nextScale, nextSalienceMax) {
      metric = nextMetric;
      scale = nextScale;
      salienceMax = nextSalienceMax;
      render();
    },
    filter(nextHides) {
      hides = nextHides;
      render();
      this.select(selected);
    },
    select(i) {
      const old = table.querySelector('tr.selected');
      if (old) {
        old.classList.remove('selected');
        old.removeAttribute('aria-current');
      }
      selected = i;
      const tr = table.querySelector(`tbody tr[data-row="${i}"]`);
      if (tr) {
        tr.classList.add('selected');
        tr.setAttribute('aria-current', 'true');
      }
    },
  };
}
