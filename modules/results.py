"""ResumableResults: one result per item, saved to a JSON file as the results come, so that a run that
stops (Ctrl-C, a crash, a judge that fails for good) loses nothing and the next run does only what is
left. evaluate_responses.py keeps its answers this way, gpt_eval.py its scores."""
import json
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text, read_json


class ResumableResults:
    """The results for `items`, in their order, kept in the JSON file at `path`.

    An earlier result in the file is kept when `keeps(record)` says it was made the way this run
    would make it (the same checkpoint, the same judge...); it stands for the item with the same
    `key` (an item and its result give the same key). `to_file(results)` is the file's content, given
    every item's result so far (None while pending); the results are that content itself, a JSON list,
    or the list under `field` of a JSON object. `what` names the file for messages.
    """

    def __init__(self, path, items, key, keeps, to_file, what, field=None):
        self.path, self.to_file = Path(path), to_file
        earlier = {key(record): record for record in self._earlier_records(what, field)
                   if isinstance(record, dict) and keeps(record)}
        self.results = [earlier.get(key(item)) for item in items]
        self.kept = len(self.results) - len(self.pending)

    @property
    def pending(self):
        """The indices of the items with no result yet."""
        return [index for index, result in enumerate(self.results) if result is None]

    def record(self, new_results):
        """Take {item index: result} and save."""
        for index, result in new_results.items():
            self.results[index] = result
        return self.save()

    def save(self):
        """Write the file whole or not at all (a reader, or the next run, never sees half of it);
        returns its content."""
        content = self.to_file(self.results)
        atomic_write_text(self.path, json.dumps(content, indent=2, ensure_ascii=False))
        return content

    def _earlier_records(self, what, field):
        if not self.path.is_file():
            return []
        what = f"{what}; move it away or choose another --out"
        content = read_json(self.path, what)
        if field is not None:
            content = content.get(field) if isinstance(content, dict) else None
        if not isinstance(content, list):
            raise UserError(f"{self.path} exists but is not {what}")
        return content
