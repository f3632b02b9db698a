// History's batches: this key's batch jobs (newest first) with their progress, a download of their results as
// JSONL (fetched with the key, so it works on a server with keys), and Cancel while one runs. The list refreshes
// itself every few seconds while a batch is unfinished and the History tab is open.
import { h, clear, fill, download } from '../dom.js';
import { duration, exactTime, num, plural, when } from '../format.js';

const REFRESH_MS = 3000;
const STATUS_WORDS = { queued: 'queued', running: 'running', completed: 'done', cancelled: 'cancelled' };

export function createBatches({ api, notify, visible }) {
  const list = document.getElementById('batches-list');
  const refresh = document.getElementById('batches-refresh');
  let timer = null;

  async function reload() {
    clearTimeout(timer);
    list.setAttribute('aria-busy', 'true');
    try {
      const page = await api.batches({ limit: 20 });
      render(page);
      if (page.batches.some((b) => b.status === 'queued' || b.status === 'running')) {
        timer = setTimeout(() => visible() && reload(), REFRESH_MS);
      }
    } catch (err) {
      fill(list, h('p', { class: 'alert error', role: 'alert' }, `The batches could not be loaded: ${err.message}`));
    } finally {
      list.setAttribute('aria-busy', 'false');
    }
  }

  async function save(batch) {
    try {
      const text = await api.batchResults(batch.batch_id);
      download(`batch-${batch.batch_id}.jsonl`, text, 'application/x-ndjson');
    } catch (err) {
      notify.error(`The results could not be downloaded: ${err.message}`);
    }
  }

  async function cancel(batch) {
    try {
      await api.cancelBatch(batch.batch_id);
      notify.info('Batch cancelled; the items already finished keep their results.');
    } catch (err) {
      notify.error(`The batch could not be cancelled: ${err.message}`);
    }
    reload();
  }

  function entry(batch) {
    const items = batch.items;
    const running = batch.status === 'queued' || batch.status === 'running';
    const facts = [
      `${items.done} of ${plural(items.total, 'item')}`,
      items.failed ? `${items.failed} failed` : null,
      items.cancelled ? `${items.cancelled} cancelled` : null,
      plural(batch.positions_done, 'position'),
      running && batch.positions_per_second ? `${num(batch.positions_per_second, 1)} positions/s` : null,
      running && batch.eta_seconds !== null ? `about ${duration(batch.eta_seconds)} left` : null,
      batch.model_id,
    ].filter(Boolean);
    const percent = items.total ? Math.round((100 * items.done) / items.total) : 0;
    return h(
      'li',
      { class: `history-item batch-item status-${batch.status}`, 'data-batch-id': batch.batch_id },
      h(
        'div',
        { class: 'history-main' },
        h('p', { class: 'preview' }, `Batch of ${plural(items.total, 'item')}`),
        h(
          'p',
          { class: 'history-facts' },
          h('span', { class: `badge ${batch.status}` }, STATUS_WORDS[batch.status] || batch.status),
          ' ',
          h('time', { datetime: batch.created_at, title: exactTime(batch.created_at) }, when(batch.created_at)),
          ` · ${facts.join(' · ')}`,
        ),
        h('progress', { class: 'batch-progress', max: 100, value: percent, 'aria-label': `${percent}% of the items done` }),
      ),
      h(
        'div',
        { class: 'history-actions' },
        h(
          'button',
          { type: 'button', class: 'secondary small', onclick: () => save(batch), disabled: !items.done, title: 'The results finished so far, one item per line' },
          'Download JSONL',
        ),
        running ? h('button', { type: 'button', class: 'secondary small', onclick: () => cancel(batch) }, 'Cancel') : null,
      ),
    );
  }

  function render(page) {
    clear(list);
    if (!page.batches.length) {
      list.append(h('p', { class: 'hint' }, 'No batches yet. Submit one with POST /api/v1/batches, client.batch(…) or talkative analyze --input.'));
      return;
    }
    list.append(h('ul', { class: 'history-items' }, page.batches.map(entry)));
    if (page.total > page.batches.length) list.append(h('p', { class: 'hint' }, `Showing the ${page.batches.length} newest of ${page.total}.`));
  }

  refresh.addEventListener('click', reload);
  return { reload };
}
