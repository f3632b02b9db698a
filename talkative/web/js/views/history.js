// History: this user's past analyses from the server's job store (newest first, a page at a time), each with
// Open and Copy link; and opening an exported file, read in the browser only.
import { h, clear, fill } from '../dom.js';
import { ImportError, parseAnalyses } from '../files.js';
import { exactTime, num, plural, when } from '../format.js';

const PAGE = 20;
const STATUS_WORDS = { queued: 'queued', processing: 'running', completed: 'done', failed: 'failed', cancelled: 'cancelled' };

export function createHistory({ api, analyses, notify, onOpen, permalink, legend, metric }) {
  const list = document.getElementById('history-list');
  const more = document.getElementById('history-more');
  const refresh = document.getElementById('history-refresh');
  const fileInput = document.getElementById('import-file');
  const drop = document.getElementById('import-drop');
  let items = [];
  let total = 0;
  let loading = false;

  async function loadPage(reset) {
    if (loading) return;
    loading = true;
    list.setAttribute('aria-busy', 'true');
    try {
      const page = await api.history({ offset: reset ? 0 : items.length, limit: PAGE });
      items = reset ? page.items : items.concat(page.items);
      total = page.total;
      render();
    } catch (err) {
      fill(list, h('p', { class: 'alert error', role: 'alert' }, `The history could not be loaded: ${err.message}`));
      more.hidden = true;
    } finally {
      loading = false;
      list.setAttribute('aria-busy', 'false');
    }
  }

  function entry(item) {
    const m = metric(); // the metric results are coloured by (its legend entry), once the legend is known
    const mean = m ? item.summary?.[m.summary_key] : null;
    const facts = [
      item.model_id,
      item.n_tokens ? plural(item.n_tokens, 'token') : null,
      item.input === 'messages' ? plural(item.n_messages, 'message') : null,
      mean !== null && mean !== undefined ? `mean ${m.short} ${num(mean)}` : null,
    ].filter(Boolean);
    const open = h('button', { type: 'button', class: 'secondary small', onclick: () => onOpen(item.request_id) }, 'Open');
    const link = h('a', { href: permalink(item.request_id), class: 'small-link', 'aria-label': `Link to “${item.preview.slice(0, 40)}”` }, 'Link');
    return h(
      'li',
      { class: `history-item status-${item.status}`, 'data-request-id': item.request_id },
      h(
        'div',
        { class: 'history-main' },
        h('p', { class: 'preview' }, item.preview || '(empty)'),
        h(
          'p',
          { class: 'history-facts' },
          h('span', { class: `badge ${item.status}` }, STATUS_WORDS[item.status] || item.status),
          ' ',
          h('time', { datetime: item.created_at, title: exactTime(item.created_at) }, when(item.created_at)),
          facts.length ? ` · ${facts.join(' · ')}` : '',
        ),
        item.error && item.status === 'failed' ? h('p', { class: 'history-error' }, item.error) : null,
      ),
      h('div', { class: 'history-actions' }, open, link),
    );
  }

  function render() {
    clear(list);
    if (!items.length) {
      list.append(h('p', { class: 'hint' }, 'Nothing yet. Analyses you run appear here, and stay after a reload or a server restart.'));
    } else {
      list.append(h('ul', { class: 'history-items' }, items.map(entry)), h('p', { class: 'hint' }, `Showing ${items.length} of ${total}.`));
    }
    more.hidden = items.length >= total;
  }

  async function importFile(file) {
    if (!file) return;
    if (file.size > 200 * 1024 * 1024) {
      notify.error(`${file.name} is larger than 200 MB; split it first.`);
      return;
    }
    try {
      const found = parseAnalyses(await file.text(), file.name, legend());
      analyses.openImported(found, file.name);
      notify.info(`Opened ${plural(found.length, 'analysis', 'analyses')} from ${file.name}.`);
      onOpen(null);
    } catch (err) {
      notify.error(err instanceof ImportError ? `${file.name}: ${err.message}` : `${file.name} could not be read: ${err.message}`);
    } finally {
      fileInput.value = '';
    }
  }

  refresh.addEventListener('click', () => loadPage(true));
  more.addEventListener('click', () => loadPage(false));
  fileInput.addEventListener('change', () => importFile(fileInput.files[0]));
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    importFile(event.dataTransfer.files[0]);
  });

  return { reload: () => loadPage(true) };
}
