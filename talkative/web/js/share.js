// Shares: a link (`/s/{id}`, which lands here as `?share=`) opens the shared result read-only, with its anchor
// highlighted and its comment shown; a result of one's own can be shared from its toolbar.
import { ApiError } from './api.js';

/** Open a share as a run of its own (no request id: the reader may not own the job). */
export async function openShare({ api, analyses, notify, shareId }) {
  try {
    const share = await api.request(`api/v1/shares/${encodeURIComponent(shareId)}`);
    const rows = share.result.tokens || [];
    const run = analyses.add({
      origin: 'shared',
      requestId: null,
      status: 'completed',
      label: `shared: ${rows.map((r) => r.token).join('').trim().slice(0, 40)}`,
      modelId: share.model_id,
      createdAt: share.created_at,
      result: share.result,
      share: { id: share.share_id, anchor: share.anchor, comment: share.comment, positions: share.positions },
    });
    analyses.activate(run.id);
  } catch (err) {
    notify.error(
      err instanceof ApiError && err.status === 404
        ? 'This share does not exist (any more): its result may have been deleted.'
        : `The share could not be opened: ${err.message}`,
    );
  }
}

/** Share a result of one's own, anchored at the selected token, with an optional comment; the link to copy. */
export async function createShare({ api, requestId, position, comment }) {
  const body = { request_id: requestId, anchor: { position } };
  if (comment) body.comment = comment;
  const made = await api.request('api/v1/shares', { method: 'POST', body });
  return new URL(made.url.replace(/^\//, ''), document.baseURI).toString();
}
