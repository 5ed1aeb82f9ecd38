"use strict";
// Problem forms: show the fields of the chosen task only.
document.addEventListener("DOMContentLoaded", () => {
  const task = document.getElementById("task");
  if (!task) return;
  const show = () => {
    for (const name of ["chat", "countdown", "math", "sudoku"]) {
      for (const el of document.querySelectorAll(".f-" + name)) el.hidden = task.value !== name;
    }
  };
  task.addEventListener("change", show);
  show();
});
