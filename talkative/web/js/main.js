// Wiring: the connection, the models, the runs, and the views. Each view module owns one part of the page.
import { Analyses } from './analyses.js';
import { Api, ApiError } from './api.js';
import { getKey } from './auth.js';
import { $, download } from './dom.js';
import { fileStem, toCsv, toJsonl } from './files.js';
import { Generations } from './generation.js';
import { Legend } from './metrics.js';
import { findModel } from './models.js';
import { load } from './prefs.js';
import { Store } from './state.js';
import { Socket } from './ws.js';
import { createAnalyseForm } from './views/analyse-form.js';
import { createGenerate } from './views/generate.js';
import { createBatches } from './views/batches.js';
import { createHistory } from './views/history.js';
import { createKeyDialog } from './views/keydialog.js';
import { preferredModel } from './views/model-picker.js';
import { createProgress } from './views/progress.js';
import { createResult } from './views/result.js';
import { createReexplain } from './reexplain.js';
import { createShare, openShare } from './share.js';
import { createRunsBar } from './views/runs-bar.js';
import { createStatus } from './views/status.js';
import { createTabs } from './views/tabs.js';
import { createNotifier } from './views/toasts.js';
import { createTooltip } from './views/tooltip.js';

const store = new Store({
  metric: load('metric', 'relative_rmse'),
  legend: new Legend(),
  apiKey: getKey(),
  modelId: null,
  models: null,
  switching: null,
  queue: null,
  activeRun: null,
  generation: null,
});
const notify = createNotifier($('#toasts'));
const keyDialog = createKeyDialog({
  store,
  onChange: () => {
    socket.reconnectNow();
    refreshModels();
    refreshLegend();
  },
});
const api = new Api({ onAuthRequired: (detail) => keyDialog.open(`The server refused the request: ${detail}`) });
const socket = new Socket({
  onMessage,
  onState(state) {
    store.set('connection', state);
    if (state.name === 'open') connected();
  },
  needsKey: () => api.needsKey(),
});
const analyses = new Analyses({ store, socket, api, notify });
const generations = new Generations({ store, socket, notify });
const tooltip = createTooltip();

export function permalink(requestId) {
  const url = new URL(window.location.href);
  url.search = '';
  url.hash = '';
  url.searchParams.set('job', requestId);
  return url.toString();
}

// -- models ---------------------------------------------------------------------------------------------------------
function setModels(listing) {
  const { type, client_request_id, ...body } = listing;
  store.set('models', body);
  if (!findModel(body, store.get('modelId'))) store.set('modelId', preferredModel(body, load('modelId', null)));
}

function refreshModels() {
  if (!socket.send({ type: 'list_model_groups' })) {
    api.models().then(setModels, (err) => {
      if (!(err instanceof ApiError && err.status === 401)) notify.error(`The model list could not be loaded: ${err.message}`);
    });
  }
}

// The metrics' legend: asked once (and again with a new key); results are drawn again when it arrives.
function refreshLegend() {
  api.metricLegend().then(
    (body) => store.set('legend', new Legend(body.metrics)),
    (err) => {
      if (!(err instanceof ApiError && err.status === 401)) notify.error(`The metric legend could not be loaded: ${err.message}`);
    },
  );
}

// -- the connection -------------------------------------------------------------------------------------------------
function connected() {
  socket.send({ type: 'list_model_groups' });
  analyses.connected();
}

function onMessage(msg) {
  switch (msg.type) {
    case 'queue_update':
      store.set('queue', msg);
      break;
    case 'model_groups_list':
      setModels(msg);
      return;
    case 'group_switch_status':
      store.set('switching', msg.status === 'starting' ? msg : null);
      if (msg.status === 'failed') notify.error(`Loading the model group ${msg.group_id} failed: ${msg.error}`);
      if (msg.status !== 'starting') socket.send({ type: 'list_model_groups' });
      return;
    case 'model_switch_complete':
      socket.send({ type: 'list_model_groups' });
      break;
    default:
      break;
  }
  if (analyses.handle(msg) || generations.handle(msg)) return;
  if (msg.type === 'error') notify.error(msg.error || 'The server reported an error.');
}

// -- views ----------------------------------------------------------------------------------------------------------
const tabs = createTabs($('.tabs'), {
  onChange(name) {
    tooltip.hide();
    if (name === 'history') {
      historyView.reload();
      batchesView.reload();
    }
  },
});
createStatus({ store, socket, onKey: (reason) => keyDialog.open(reason) });
$('#key-button').addEventListener('click', () => keyDialog.open());

const form = createAnalyseForm({ store, onSubmit: (request) => analyses.submit(request) });
createRunsBar({ store, analyses });
createProgress({ store, analyses });
createResult({
  store,
  analyses,
  tooltip,
  actions: {
    exportJsonl: (run) => download(`${fileStem(run)}.jsonl`, toJsonl([run]), 'application/x-ndjson'),
    exportCsv: (run) => download(`${fileStem(run)}.csv`, toCsv(run.result.tokens, store.get('legend')), 'text/csv'),
    async copyLink(run) {
      const link = permalink(run.requestId);
      try {
        await navigator.clipboard.writeText(link);
        notify.info(`Link copied: ${link}`);
      } catch {
        notify.info(`Link to this result: ${link}`);
      }
    },
    editInput(run) {
      form.setInput(run.input);
      $('#analyse-form').scrollIntoView({ block: 'start' });
    },
    reexplain: createReexplain(api),
    async share(run, row) {
      if (!row) return;
      const comment = window.prompt(`Share token ${row.position} (${row.token.trim() || 'whitespace'}): an optional comment (512 characters at most)`, '');
      if (comment === null) return;
      try {
        const link = await createShare({ api, requestId: run.requestId, position: row.position, comment: comment.slice(0, 512) });
        try {
          await navigator.clipboard.writeText(link);
          notify.info(`Share link copied: ${link}`);
        } catch {
          notify.info(`Share link: ${link}`);
        }
      } catch (err) {
        notify.error(`The result could not be shared: ${err.message}`);
      }
    },
  },
});
createGenerate({
  store,
  generations,
  onAnalyse(input) {
    tabs.select('analyse');
    form.setInput(input);
    form.submit();
  },
});
const historyView = createHistory({
  api,
  analyses,
  notify,
  onOpen: openJob,
  permalink,
  legend: () => store.get('legend'),
  metric: () => store.get('legend').get(store.get('metric')),
});
const batchesView = createBatches({ api, notify, visible: () => tabs.current() === 'history' });

async function openJob(requestId) {
  tabs.select('analyse');
  if (!requestId) return;
  try {
    await analyses.openJob(requestId);
  } catch (err) {
    notify.error(
      err instanceof ApiError && err.status === 404
        ? `There is no stored analysis ${requestId} on this server (results are kept for a limited time).`
        : `The analysis ${requestId} could not be opened: ${err.message}`,
    );
  }
}

// The address bar always holds the permalink of the result on screen.
function syncAddress() {
  const run = analyses.active();
  const url = new URL(window.location.href);
  const want = run && run.requestId ? run.requestId : null;
  if (url.searchParams.get('job') === want) return;
  if (want) url.searchParams.set('job', want);
  else url.searchParams.delete('job');
  window.history.replaceState(null, '', url);
}
store.on('activeRun', syncAddress);
store.on('runs', (_, run) => {
  if (run && run.id === store.get('activeRun')) syncAddress();
  if (run && run.status === 'completed' && tabs.current() === 'history') historyView.reload();
});

// -- start ----------------------------------------------------------------------------------------------------------
refreshLegend();
refreshModels();
socket.start();
const job = new URLSearchParams(window.location.search).get('job');
if (job) openJob(job);
const shared = new URLSearchParams(window.location.search).get('share');
if (shared) openShare({ api, analyses, notify, shareId: shared });
