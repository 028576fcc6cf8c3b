/* captionflow report: pages, sorts and filters the records in the browser.
 *
 * The records come from data/*.js, loaded with <script src> (a page opened from disk may not
 * request its neighbours as data): each calls captionflowReport(kind, index, rows). Captions,
 * file names and messages are untrusted text: they are only ever set with textContent, or as
 * the value of a property such as alt, never parsed as HTML. Nothing comes from the network.
 */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("report-config").textContent);
  // Positions in a record's row: as captionflow/report/data.py writes them.
  var URI = 0, NAME = 1, TEXT = 2, SCORE = 3, THUMB = 4, WIDTH = 5, HEIGHT = 6, MODELS = 7;
  // Positions in an error's row.
  var E_URI = 0, E_STAGE = 1, E_TYPE = 2, E_MESSAGE = 3;
  var FAILURES_PER_GROUP = 200; // rows shown per error type before "show more"
  var PARALLEL_LOADS = 4;

  var records = { captions: [], rejected: [], errors: [] };
  var candidates = { captions: {}, rejected: {} }; // chunk index -> rows, once loaded
  var pendingCandidates = {}; // script path -> callbacks waiting for it
  var searchText = { captions: null, rejected: null, errors: null }; // lowercased, lazily
  var wordCounts = { captions: null, rejected: null };

  var state = {
    tab: "captions",
    views: {
      captions: freshView(),
      rejected: freshView(),
      errors: freshView()
    },
    ready: false
  };

  function freshView() {
    return { sort: "name", query: "", minWords: "", maxWords: "", page: 0, order: null, expanded: {} };
  }

  // The cards' thumbnail boxes fit the thumbnails' size.
  document.documentElement.style.setProperty("--thumb", Math.max(96, config.thumbSide) + "px");

  function $(id) { return document.getElementById(id); }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // A record's image: its URI, or, for an image under the output, none and its file name.
  function uriOf(row) { return row[URI] !== null ? row[URI] : config.uriPrefix + row[NAME]; }
  function nameOf(row) { return row[NAME] !== null ? row[NAME] : row[URI]; }

  function pad(index) {
    var text = String(index);
    while (text.length < 5) text = "0" + text;
    return text;
  }

  function chunkPath(kind, index) {
    return config.dataDir + "/" + kind + "-" + pad(index) + ".js";
  }

  function chunkCount(kind) {
    return Math.ceil(config.counts[kind] / config.chunkRecords);
  }

  function formatCount(value) {
    return Number(value).toLocaleString("en-US");
  }

  function formatScore(value) {
    if (value === null || value === undefined) return "no score";
    if (value !== 0 && Math.abs(value) < 0.001) return value.toExponential(2);
    return value.toFixed(3);
  }

  function formatProbability(value) {
    if (value === null || value === undefined) return "no probability";
    var percent = value * 100;
    return (percent < 0.1 && percent > 0 ? percent.toExponential(1) : percent.toFixed(1)) + "%";
  }

  // The global each data file calls.
  window[config.register] = function (kind, index, rows) {
    var base = index * config.chunkRecords;
    if (kind === "captions" || kind === "rejected" || kind === "errors") {
      var target = records[kind];
      for (var i = 0; i < rows.length; i++) target[base + i] = rows[i];
    } else if (kind === "captions-candidates" || kind === "rejected-candidates") {
      candidates[kind.slice(0, kind.indexOf("-"))][index] = rows;
    }
  };

  function loadScript(path, done, failed) {
    var script = document.createElement("script");
    script.src = path;
    script.async = true;
    script.onload = function () { script.remove(); done(); };
    script.onerror = function () { script.remove(); failed(path); };
    document.body.appendChild(script);
  }

  /* Every record chunk, a few at a time; then the first page. */
  function loadRecords() {
    var queue = [];
    ["captions", "rejected", "errors"].forEach(function (kind) {
      for (var i = 0; i < chunkCount(kind); i++) queue.push(chunkPath(kind, i));
    });
    var total = queue.length, loaded = 0, running = 0, failed = [];
    var records_total = config.counts.captions + config.counts.rejected + config.counts.errors;
    if (!total) return finish();

    function next() {
      while (running < PARALLEL_LOADS && queue.length) {
        running++;
        loadScript(queue.shift(), settle, function (path) { failed.push(path); settle(); });
      }
    }
    function settle() {
      running--;
      loaded++;
      var have = records.captions.length + records.rejected.length + records.errors.length;
      setStatus("Loading the records… " + formatCount(Math.min(have, records_total)) + " of " +
        formatCount(records_total));
      if (loaded === total) finish(); else next();
    }
    function finish() {
      state.ready = true;
      if (failed.length) {
        showProblem("Some data files could not be loaded (" + failed.join(", ") +
          "): the report folder is incomplete; make the report again.");
      }
      render();
    }
    next();
  }

  function setStatus(text) { $("status").textContent = text; }

  function showProblem(text) {
    var banner = element("p", "banner", text);
    banner.id = "load-problem";
    $("status").before(banner);
  }

  /* Sorting and filtering: a view is the list of record indices, in order, that match. */

  function lowered(kind) {
    if (!searchText[kind]) {
      var rows = records[kind], texts = new Array(rows.length);
      for (var i = 0; i < rows.length; i++) {
        var row = rows[i];
        texts[i] = kind === "errors"
          ? (row[E_URI] + "\n" + row[E_TYPE] + "\n" + row[E_MESSAGE] + "\n" + row[E_STAGE]).toLowerCase()
          : (row[TEXT] + "\n" + nameOf(row)).toLowerCase();
      }
      searchText[kind] = texts;
    }
    return searchText[kind];
  }

  function words(kind) {
    if (!wordCounts[kind]) {
      var rows = records[kind], counts = new Int32Array(rows.length);
      for (var i = 0; i < rows.length; i++) {
        var text = rows[i][TEXT].trim();
        counts[i] = text ? text.split(/\s+/).length : 0;
      }
      wordCounts[kind] = counts;
    }
    return wordCounts[kind];
  }

  function parseCount(text) {
    if (text === "" || text === null || text === undefined) return null;
    var value = Number(text);
    return isFinite(value) ? value : null;
  }

  function computeOrder(kind) {
    var view = state.views[kind], rows = records[kind];
    var terms = view.query.toLowerCase().split(/\s+/).filter(Boolean);
    var texts = terms.length ? lowered(kind) : null;
    var minWords = kind === "errors" ? null : parseCount(view.minWords);
    var maxWords = kind === "errors" ? null : parseCount(view.maxWords);
    var counts = minWords !== null || maxWords !== null || view.sort.indexOf("length") === 0
      ? words(kind) : null;
    var order = [];
    for (var i = 0; i < rows.length; i++) {
      if (texts) {
        var text = texts[i], all = true;
        for (var t = 0; t < terms.length; t++) {
          if (text.indexOf(terms[t]) < 0) { all = false; break; }
        }
        if (!all) continue;
      }
      if (minWords !== null && counts[i] < minWords) continue;
      if (maxWords !== null && counts[i] > maxWords) continue;
      order.push(i);
    }
    if (kind !== "errors") sortOrder(order, rows, view.sort, counts);
    return order;
  }

  function sortOrder(order, rows, sort, counts) {
    // Records are written sorted by file name: "name" is the order they came in.
    if (sort === "score-asc" || sort === "score-desc") {
      var sign = sort === "score-asc" ? 1 : -1;
      order.sort(function (a, b) {
        var x = rows[a][SCORE], y = rows[b][SCORE];
        if (x === null || y === null) return (x === null) - (y === null) || a - b; // no score: last
        return sign * (x - y) || a - b;
      });
    } else if (sort === "length-asc" || sort === "length-desc") {
      var direction = sort === "length-asc" ? 1 : -1;
      order.sort(function (a, b) {
        return direction * (counts[a] - counts[b] ||
          rows[a][TEXT].length - rows[b][TEXT].length) || a - b;
      });
    }
  }

  function currentOrder() {
    var view = state.views[state.tab];
    if (!view.order) view.order = computeOrder(state.tab);
    return view.order;
  }

  /* Rendering. */

  function render() {
    var kind = state.tab, view = state.views[kind];
    document.querySelectorAll(".tab").forEach(function (tab) {
      tab.setAttribute("aria-selected", tab.dataset.tab === kind ? "true" : "false");
    });
    $("controls").classList.toggle("failures-mode", kind === "errors");
    $("search").value = view.query;
    $("sort").value = view.sort;
    $("min-words").value = view.minWords;
    $("max-words").value = view.maxWords;
    if (!state.ready) return;
    var order = currentOrder();
    var total = records[kind].length;
    if (kind === "errors") {
      $("grid").hidden = true;
      $("failures").hidden = false;
      clear($("pager-top"));
      clear($("pager-bottom"));
      renderFailures(order);
      setStatus(total === 0 ? "No image failed." :
        formatCount(order.length) + " failed image" + (order.length === 1 ? "" : "s") +
        (order.length < total ? " (of " + formatCount(total) + ")" : "") +
        ", by error type");
      return;
    }
    $("grid").hidden = false;
    $("failures").hidden = true;
    var pages = Math.max(1, Math.ceil(order.length / config.pageSize));
    view.page = Math.min(Math.max(view.page, 0), pages - 1);
    var start = view.page * config.pageSize;
    var shown = order.slice(start, start + config.pageSize);
    renderCards(kind, shown);
    renderPager($("pager-top"), pages);
    renderPager($("pager-bottom"), pages);
    if (total === 0) {
      setStatus(kind === "rejected" ? "No image was rejected." : "No image is captioned yet.");
    } else if (order.length === 0) {
      setStatus("No image matches (of " + formatCount(total) + ").");
    } else {
      setStatus("Showing " + formatCount(start + 1) + "–" + formatCount(start + shown.length) +
        " of " + formatCount(order.length) +
        (order.length < total ? " (filtered from " + formatCount(total) + ")" : ""));
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function thumbnail(row, className) {
    var box = element("span", className || "thumb");
    if (row[THUMB]) {
      var img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = row[TEXT];
      var side = config.thumbSide, w = row[WIDTH], h = row[HEIGHT];
      if (w && h) { // the thumbnail's own size: no jump as it arrives
        var scale = Math.min(1, side / Math.max(w, h));
        img.width = Math.max(1, Math.round(w * scale));
        img.height = Math.max(1, Math.round(h * scale));
      }
      img.onerror = function () { img.replaceWith(element("span", "placeholder", "no preview")); };
      img.src = config.thumbsDir + "/" + row[THUMB] + ".jpg";
      box.appendChild(img);
    } else {
      box.appendChild(element("span", "placeholder", "no preview: the image could not be read"));
    }
    return box;
  }

  function renderCards(kind, indices) {
    var grid = $("grid"), rows = records[kind];
    var fragment = document.createDocumentFragment();
    indices.forEach(function (index) {
      var row = rows[index];
      var card = element("button", "card");
      card.type = "button";
      card.dataset.index = String(index);
      card.dataset.kind = kind;
      card.appendChild(thumbnail(row));
      card.appendChild(element("span", "caption", row[TEXT]));
      var meta = element("span", "meta");
      var score = element("span", "score" + (row[SCORE] === null ? " none" : ""), formatScore(row[SCORE]));
      meta.appendChild(score);
      var name = element("span", "name", nameOf(row));
      name.title = uriOf(row);
      meta.appendChild(name);
      card.appendChild(meta);
      fragment.appendChild(card);
    });
    clear(grid);
    grid.appendChild(fragment);
    window.scrollTo({ top: Math.min(window.scrollY, $("grid").offsetTop - 120) });
  }

  function renderPager(nav, pages) {
    clear(nav);
    var view = state.views[state.tab];
    if (pages <= 1) return;
    function button(label, page, disabled) {
      var b = element("button", "page", label);
      b.type = "button";
      b.disabled = disabled;
      b.addEventListener("click", function () { view.page = page; render(); });
      return b;
    }
    nav.appendChild(button("« first", 0, view.page === 0));
    nav.appendChild(button("‹ previous", view.page - 1, view.page === 0));
    nav.appendChild(element("span", "where", "page " + formatCount(view.page + 1) + " of " + formatCount(pages)));
    nav.appendChild(button("next ›", view.page + 1, view.page >= pages - 1));
    nav.appendChild(button("last »", pages - 1, view.page >= pages - 1));
  }

  function renderFailures(order) {
    var box = $("failures"), rows = records.errors, view = state.views.errors;
    clear(box);
    var groups = {}, names = [];
    order.forEach(function (index) {
      var type = rows[index][E_TYPE];
      if (!groups[type]) { groups[type] = []; names.push(type); }
      groups[type].push(index);
    });
    names.sort(function (a, b) { return groups[b].length - groups[a].length || (a < b ? -1 : a > b ? 1 : 0); });
    names.forEach(function (type, position) {
      var members = groups[type];
      var group = element("details", "failure-group");
      group.dataset.errorType = type;
      group.open = position < 5;
      var summary = element("summary");
      summary.appendChild(element("span", "error-type", type));
      summary.appendChild(element("span", "count", formatCount(members.length)));
      group.appendChild(summary);
      var table = element("table");
      var columns = element("colgroup");
      ["uri", "stage", "message"].forEach(function (name) { columns.appendChild(element("col", name)); });
      table.appendChild(columns);
      var head = element("tr");
      ["image", "stage", "message"].forEach(function (name) { head.appendChild(element("th", null, name)); });
      table.appendChild(element("thead")).appendChild(head);
      var body = element("tbody");
      var limit = view.expanded[type] ? members.length : FAILURES_PER_GROUP;
      members.slice(0, limit).forEach(function (index) {
        var row = rows[index], line = element("tr", "failure");
        line.appendChild(element("td", "uri", row[E_URI]));
        line.appendChild(element("td", "stage", row[E_STAGE]));
        line.appendChild(element("td", "message", row[E_MESSAGE]));
        body.appendChild(line);
      });
      table.appendChild(body);
      group.appendChild(table);
      if (members.length > limit) {
        var more = element("button", "more", "show all " + formatCount(members.length));
        more.type = "button";
        more.addEventListener("click", function () { view.expanded[type] = true; render(); });
        group.appendChild(more);
      }
      box.appendChild(group);
    });
  }

  /* The detail of one card: every candidate, its score as a bar, its probability. */

  var shownDetail = null; // {kind, index} of the open card: ← and → move along the view

  function openDetail(kind, index) {
    shownDetail = { kind: kind, index: index };
    var row = records[kind][index];
    var dialog = $("detail");
    var thumb = $("detail-thumb");
    clear(thumb);
    thumb.appendChild(thumbnail(row));
    $("detail-caption").textContent = row[TEXT];
    var meta = $("detail-meta");
    clear(meta);
    var models = config.models[row[MODELS]] || ["", ""];
    [
      ["score", formatScore(row[SCORE])],
      ["file", nameOf(row)],
      ["image", uriOf(row)],
      ["size", row[WIDTH] && row[HEIGHT] ? row[WIDTH] + " × " + row[HEIGHT] : "unknown"],
      ["captioner", models[0] || "unknown"],
      ["ranker", models[1] || "unknown"],
      ["status", kind === "rejected" ? "rejected: its best score is below --min-score" : "captioned"]
    ].forEach(function (pair) {
      meta.appendChild(element("dt", null, pair[0]));
      meta.appendChild(element("dd", null, pair[1]));
    });
    var list = $("candidates");
    clear(list);
    list.dataset.kind = kind;
    list.dataset.index = String(index);
    var chunk = Math.floor(index / config.chunkRecords);
    var offset = index - chunk * config.chunkRecords;
    if (!dialog.open) dialog.showModal();
    withCandidates(kind, chunk, function (rows) {
      if (list.dataset.kind !== kind || list.dataset.index !== String(index)) return; // another card since
      renderCandidates(list, rows ? rows[offset] : null);
    });
  }

  function withCandidates(kind, chunk, callback) {
    if (candidates[kind][chunk]) return callback(candidates[kind][chunk]);
    var path = chunkPath(kind + "-candidates", chunk);
    if (pendingCandidates[path]) { pendingCandidates[path].push(callback); return; }
    pendingCandidates[path] = [callback];
    $("candidates").appendChild(element("li", "muted loading", "loading the candidates…"));
    function settle() {
      var waiting = pendingCandidates[path];
      delete pendingCandidates[path];
      waiting.forEach(function (wait) { wait(candidates[kind][chunk] || null); });
    }
    loadScript(path, settle, settle);
  }

  function renderCandidates(list, rows) {
    clear(list);
    if (!rows) {
      list.appendChild(element("li", "muted", "The candidates could not be loaded."));
      return;
    }
    var range = config.scoreRange;
    rows.forEach(function (candidate, position) {
      var item = element("li", "candidate" + (position === 0 ? " best" : ""));
      item.appendChild(element("span", "candidate-text", candidate[0]));
      var numbers = element("span", "candidate-numbers");
      var bar = element("span", "bar");
      var fill = element("span", "fill");
      var score = candidate[1];
      if (score !== null && range) {
        var share = range[1] > range[0] ? (score - range[0]) / (range[1] - range[0]) : 1;
        fill.style.width = (Math.max(0.02, Math.min(1, share)) * 100).toFixed(1) + "%";
      }
      bar.title = "score " + formatScore(score) + (range ? " (scale " + formatScore(range[0]) +
        " to " + formatScore(range[1]) + ")" : "");
      bar.appendChild(fill);
      numbers.appendChild(bar);
      numbers.appendChild(element("span", "candidate-score", "score " + formatScore(score)));
      numbers.appendChild(element("span", "probability", "probability " + formatProbability(candidate[2])));
      item.appendChild(numbers);
      list.appendChild(item);
    });
  }

  /* Controls. */

  function changed(update) {
    var view = state.views[state.tab];
    update(view);
    view.order = null;
    view.page = 0;
    render();
  }

  var typing = null;
  $("search").addEventListener("input", function (event) {
    var value = event.target.value;
    clearTimeout(typing);
    typing = setTimeout(function () { changed(function (view) { view.query = value; }); }, 120);
  });
  $("sort").addEventListener("change", function (event) {
    changed(function (view) { view.sort = event.target.value; });
  });
  $("min-words").addEventListener("input", function (event) {
    changed(function (view) { view.minWords = event.target.value; });
  });
  $("max-words").addEventListener("input", function (event) {
    changed(function (view) { view.maxWords = event.target.value; });
  });
  $("reset").addEventListener("click", function () {
    state.views[state.tab] = freshView();
    render();
  });
  document.querySelectorAll(".tab").forEach(function (tab) {
    tab.addEventListener("click", function () {
      state.tab = tab.dataset.tab;
      render();
    });
  });
  $("grid").addEventListener("click", function (event) {
    var card = event.target.closest(".card");
    if (card) openDetail(card.dataset.kind, Number(card.dataset.index));
  });
  $("detail").addEventListener("keydown", function (event) {
    if (!shownDetail || (event.key !== "ArrowLeft" && event.key !== "ArrowRight")) return;
    var view = state.views[shownDetail.kind], order = view.order || [];
    var position = order.indexOf(shownDetail.index) + (event.key === "ArrowRight" ? 1 : -1);
    if (position < 0 || position >= order.length) return;
    event.preventDefault();
    var page = Math.floor(position / config.pageSize);
    if (page !== view.page) { view.page = page; render(); } // the grid follows
    openDetail(shownDetail.kind, order[position]);
  });
  $("detail").addEventListener("click", function (event) {
    if (event.target === $("detail")) $("detail").close(); // a click on the backdrop
  });

  render();
  loadRecords();
})();
