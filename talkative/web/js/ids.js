// Client request ids: unique per page, readable in server logs.
let counter = 0;

export function newId(prefix) {
  counter += 1;
  return `${prefix}-${Date.now().toString(36)}-${counter.toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

/** Replies to control frames (cancel, subscribe) carry these ids, so an error about a cancel is not mistaken
 * for the failure of the job it names. */
export const CONTROL = 'ctl:';
