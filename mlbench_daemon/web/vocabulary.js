// The closed vocabularies the page shows (node phases, job and run states), read from the
// daemon's served OpenAPI document, which declares each from the Python enum the daemon
// uses: the page copies no list of names.  Loaded once, before the first render; a
// failed load is tried again by the next poll round.

import { getJSON } from "./api.js";

export const vocabulary = { phases: [], states: [], runStates: [] };

let loading = null;

// `styled`: the names the page gives a look or a meaning of its own ({phases, states,
// runStates}); one the document does not declare is a drift between the page and the
// daemon, and is reported on the console (the page tests fail on any console error).
export function loadVocabulary(styled) {
  if (!loading) {
    loading = getJSON("/api/openapi.json", { timeout: 30000 }).then(
      (doc) => {
        const schemas = doc.components.schemas;
        vocabulary.phases = schemas.Phase.enum;
        vocabulary.states = schemas.JobState.enum;
        vocabulary.runStates = schemas.RunState.enum;
        for (const [kind, names] of Object.entries(styled)) {
          for (const name of names) {
            if (!vocabulary[kind].includes(name))
              console.error(`the page knows ${kind} "${name}", which /api/openapi.json does not declare`);
          }
        }
        return vocabulary;
      },
      (e) => {
        loading = null;
        throw e;
      },
    );
  }
  return loading;
}
