// bonefrac upload page: vanilla JS, no external resources (the page must work offline).
// Server data is only ever inserted as text (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form");
  const input = $("files");
  const dropzone = $("dropzone");
  const fileList = $("file-list");
  const statusLine = $("status");
  const errors = $("errors");
  const results = $("results");
  const analyseButton = $("analyse");
  let chosen = [];
  let objectUrls = [];

  const AGE_GROUPS = { adult: "Adult", child: "Child", unknown: "Not stated" };

  const FINDINGS = {
    // The model detects MURA's "abnormal" label, not fractures as such (the API keeps its keys).
    fracture: { label: "Abnormality suspected (fracture, hardware, degenerative change, …)", css: "fracture" },
    no_fracture: { label: "No abnormality detected", css: "no-fracture" },
    uncertain: { label: "Uncertain", css: "uncertain" },
    out_of_scope: { label: "Not assessed: a body part the models do not cover", css: "uncertain" },
  };

  // el("p", {class: "x"}, "text", child) -> element; strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  const percent = (p) => `${(100 * p).toFixed(p < 0.01 || p > 0.99 ? 1 : 0)}%`;
  const title = (s) => (s ? s.charAt(0).toUpperCase() + s.slice(1) : "");
  const formatSize = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1e3))} kB`);

  function setFiles(list) {
    chosen = Array.from(list || []);
    fileList.replaceChildren(
      ...chosen.map((f) => el("li", {}, el("span", { class: "file-name", text: f.name }), ` ${formatSize(f.size)}`)),
    );
    analyseButton.textContent = chosen.length > 1 ? `Analyse study (${chosen.length} images)` : "Analyse";
  }

  function clearOutput() {
    errors.replaceChildren();
    results.replaceChildren();
    statusLine.textContent = "";
    objectUrls.forEach((url) => URL.revokeObjectURL(url));
    objectUrls = [];
  }

  function showError(heading, message, code) {
    const hint =
      code === "out_of_distribution"
        ? "If you are sure this is an elbow, hand or shoulder X-ray, tick “Analyse even if…” and try again."
        : null;
    errors.append(
      el(
        "div",
        { class: "error", role: "alert" },
        el("h2", { class: "error-title", text: heading }),
        el("p", { text: message }),
        hint && el("p", { class: "error-hint", text: hint }),
        code && el("p", { class: "error-code", text: `Error code: ${code}` }),
      ),
    );
  }

  input.addEventListener("change", () => setFiles(input.files));
  ["dragenter", "dragover"].forEach((type) =>
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    }),
  );
  ["dragleave", "drop"].forEach((type) =>
    dropzone.addEventListener(type, () => dropzone.classList.remove("dragging")),
  );
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) setFiles(event.dataTransfer.files);
  });
  $("clear").addEventListener("click", () => {
    form.reset();
    setFiles([]);
    clearOutput();
    input.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    analyse();
  });

  async function analyse() {
    clearOutput();
    if (!chosen.length) {
      showError("No file chosen", "Choose one or more X-ray files (PNG, JPEG or DICOM) first.", null);
      input.focus();
      return;
    }
    const files = chosen.slice();
    const single = files.length === 1;
    const body = new FormData();
    files.forEach((file) => body.append(single ? "image" : "images", file, file.name));
    body.append("explain", $("explain").checked ? "true" : "false");
    body.append("allow_ood", $("allow-ood").checked ? "true" : "false");
    body.append("age_group", $("age-group").value);
    body.append("body_part", $("body-part").value);

    analyseButton.disabled = true;
    statusLine.textContent = single ? "Analysing the image…" : `Analysing the study of ${files.length} images…`;
    try {
      const response = await fetch(single ? "/predict" : "/predict_study", { method: "POST", body });
      let data = null;
      try {
        data = await response.json();
      } catch (_) {
        data = null;
      }
      const what = single ? files[0].name : `the study (${files.map((f) => f.name).join(", ")})`;
      if (!response.ok || !data || data.error) {
        const error = (data && data.error) || {};
        showError(
          `Could not analyse ${what}`,
          error.message || `The server answered ${response.status} ${response.statusText}.`,
          error.code || null,
        );
        statusLine.textContent = "";
        return;
      }
      statusLine.textContent = "Analysis complete.";
      results.append(renderResult(data, files));
      results.focus();
    } catch (err) {
      showError("The server could not be reached", "Check the connection and try again.", null);
      statusLine.textContent = "";
    } finally {
      analyseButton.disabled = false;
    }
  }

  // -- rendering --------------------------------------------------------------------------

  function renderResult(data, files) {
    const study = data.level === "study";
    const heading = study ? `Study of ${data.n_images} images` : files[0].name;
    const article = el(
      "article",
      { class: "result", "aria-labelledby": "result-title" },
      el(
        "header",
        { class: "result-header" },
        el("h2", { id: "result-title", text: heading }),
        findingBadge(data.fracture.finding),
      ),
      renderNotices(data.notices),
    );
    const summary = el("div", { class: "summary" });
    if (!study) summary.append(renderFigure(data, files[0]));
    summary.append(renderFacts(data, study));
    article.append(summary);
    if (study) {
      article.append(
        el("h3", { class: "section-title", text: "Images" }),
        el("div", { class: "image-grid" }, data.images.map((image, i) => renderImageCard(image, files[i]))),
      );
    }
    article.append(renderRecommendation(data.recommendation));
    article.append(renderVersions(data));
    article.append(el("p", { class: "result-disclaimer" }, el("strong", { text: "Disclaimer: " }), data.disclaimer));
    return article;
  }

  function renderNotices(notices) {
    if (!notices || !notices.length) return null;
    return el(
      "ul",
      { class: "notices", "aria-label": "Notices" },
      notices.map((text) => el("li", { class: "notice", text })),
    );
  }

  function findingBadge(finding) {
    const info = FINDINGS[finding] || { label: finding, css: "uncertain" };
    return el("span", { class: `badge finding-${info.css}`, "data-finding": finding, text: info.label });
  }

  function renderFigure(data, file) {
    const figure = el("figure", { class: "xray" });
    const originalUrl = URL.createObjectURL(file);
    objectUrls.push(originalUrl);
    const heatmapUrl = data.heatmap ? `data:image/png;base64,${data.heatmap}` : null;
    const img = el("img", {
      src: heatmapUrl || originalUrl,
      alt: heatmapUrl ? `Grad-CAM heatmap over ${file.name}` : `X-ray ${file.name}`,
    });
    figure.append(img);
    const caption = el("figcaption", {});
    if (heatmapUrl) {
      caption.append(heatmapCaption(data.heatmap_info));
      const toggle = el("button", { type: "button", class: "button small", "aria-pressed": "true", text: "Hide heatmap" });
      toggle.addEventListener("click", () => {
        const showing = toggle.getAttribute("aria-pressed") === "true";
        img.src = showing ? originalUrl : heatmapUrl;
        img.alt = showing ? `X-ray ${file.name}` : `Grad-CAM heatmap over ${file.name}`;
        toggle.setAttribute("aria-pressed", showing ? "false" : "true");
        toggle.textContent = showing ? "Show heatmap" : "Hide heatmap";
      });
      // Browsers cannot display DICOM: then only the heatmap (over the model input) is shown.
      const probe = new Image();
      probe.onerror = () => toggle.remove();
      probe.src = originalUrl;
      caption.append(toggle);
    } else {
      img.onerror = () => {
        figure.replaceChildren(el("p", { class: "muted", text: "This file type cannot be displayed by the browser." }));
      };
    }
    figure.append(caption);
    return figure;
  }

  function heatmapCaption(info) {
    if (info && info.empty) {
      return el("span", { class: "muted", text: "Heatmap: no region raised the abnormality score." });
    }
    return el("span", { class: "muted", text: "Heatmap: red = regions that raised the abnormality score most." });
  }

  // "other" is the body-part model's class for parts without a fracture model
  const partName = (label) => (label === "other" ? "Other (not elbow, hand or shoulder)" : title(label));

  function renderFacts(data, study) {
    const part = data.body_part;
    const partProb = part.probabilities[part.label];
    const facts = el("dl", { class: "facts" });
    facts.append(
      el("dt", { text: study ? "Body part (combined)" : "Body part" }),
      el(
        "dd",
        { "data-field": "body-part" },
        el("strong", { text: partName(part.label) }),
        ` (${percent(partProb)})`,
        part.confident || part.stated ? null : el("span", { class: "badge finding-uncertain small", text: "uncertain" }),
      ),
    );
    if (part.stated) {
      facts.append(
        el("dt", { text: "Body part stated" }),
        el(
          "dd",
          { "data-field": "stated-part" },
          el("strong", { text: partName(part.stated) }),
          part.disagrees
            ? el("span", { class: "badge finding-uncertain small", "data-field": "part-disagrees", text: "disagrees with the model" })
            : " (the model agrees)",
        ),
      );
    }
    facts.append(
      el("dt", { text: study ? "Abnormality probability (mean of images)" : "Abnormality probability" }),
      el("dd", {}, probabilityBar(data.fracture)),
      el("dt", { text: "Finding" }),
      el("dd", { "data-field": "finding" }, findingBadge(data.fracture.finding)),
      el("dt", { text: "Model sensitivity" }),
      el("dd", { "data-field": "sensitivity" }, sensitivityText(data.fracture)),
      el("dt", { text: "Age group" }),
      el("dd", { "data-field": "age-group" }, AGE_GROUPS[data.age_group] || AGE_GROUPS.unknown),
      el("dt", { text: "Image quality" }),
      el(
        "dd",
        {},
        data.quality.accepted
          ? "Looks like the training radiographs"
          : "Unlike the training radiographs (analysed by override)",
        el("span", { class: "muted", text: ` · OOD score ${data.quality.ood_score.toFixed(2)} (limit ${data.quality.ood_limit})` }),
      ),
    );
    return facts;
  }

  // The model's sensitivity on validation studies (never the test split), with its interval.
  function sensitivityText(fracture) {
    if (fracture.model === null) return "No model assessed this body part.";
    const s = fracture.sensitivity;
    if (!s || !s.at_threshold || s.at_threshold.value === null) {
      return "Not recorded for this model: treat every result with caution.";
    }
    const range = (x) => `${percent(x.value)} (${s.interval} CI ${percent(x.ci[0])}–${percent(x.ci[1])}, ${x.detected}/${x.n_positive} abnormal ${s.split} studies)`;
    const parts = [`${range(s.at_threshold)} at the threshold.`];
    if (s.at_negative_cutoff && s.at_negative_cutoff.value !== null) {
      parts.push(
        ` A “no abnormality” counts as confident only below ${percent(fracture.negative_cutoff)}, ` +
          `a cut-off chosen to catch ${percent(s.target)} of abnormal studies: ${range(s.at_negative_cutoff)}.`,
      );
    }
    return parts.join("");
  }

  function probabilityBar(fracture) {
    if (fracture.probability === null) {
      return el("div", { class: "prob muted", "data-field": "probability", text: "Not assessed: no model covers this body part." });
    }
    const p = fracture.probability;
    const t = fracture.threshold;
    const band = fracture.uncertain_band || 0;
    const info = FINDINGS[fracture.finding] || FINDINGS.uncertain;
    const fill = el("div", { class: `bar-fill finding-${info.css}` });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    const bandEl = el("div", { class: "bar-band", title: "uncertain band" });
    bandEl.style.left = `${(100 * Math.max(0, t - band)).toFixed(1)}%`;
    bandEl.style.width = `${(100 * (Math.min(1, t + band) - Math.max(0, t - band))).toFixed(1)}%`;
    const marker = el("div", { class: "bar-threshold", title: `threshold ${t.toFixed(2)}` });
    marker.style.left = `${(100 * t).toFixed(1)}%`;
    return el(
      "div",
      { class: "prob" },
      el("div", { class: "prob-value", "data-field": "probability", text: percent(p) }),
      el(
        "div",
        {
          class: "bar",
          role: "meter",
          "aria-label": "Abnormality probability",
          "aria-valuemin": "0",
          "aria-valuemax": "100",
          "aria-valuenow": (100 * p).toFixed(0),
          "aria-valuetext": `${percent(p)}, threshold ${percent(t)}`,
        },
        bandEl,
        fill,
        marker,
      ),
      el("div", { class: "prob-scale muted", text: `threshold ${percent(t)} · uncertain within ±${percent(band)} · calibrated` }),
    );
  }

  function renderImageCard(image, file) {
    const card = el("div", { class: "image-card" });
    if (image.heatmap) {
      card.append(el("img", { src: `data:image/png;base64,${image.heatmap}`, alt: `Grad-CAM heatmap over ${file ? file.name : "image"}` }));
    } else if (file) {
      const url = URL.createObjectURL(file);
      objectUrls.push(url);
      const img = el("img", { src: url, alt: `X-ray ${file.name}` });
      img.onerror = () => img.remove();
      card.append(img);
    }
    card.append(
      el("p", { class: "file-name", text: file ? file.name : `Image ${image.index + 1}` }),
      el("p", {}, "Body part: ", el("strong", { text: partName(image.body_part.label) }), ` (${percent(image.body_part.probabilities[image.body_part.label])})`),
      probabilityBar(image.fracture),
      findingBadge(image.fracture.finding),
    );
    return card;
  }

  function renderRecommendation(rec) {
    const number = new Map(rec.sources.map((s, i) => [s.id, i + 1]));
    const cite = (statement) => {
      const refs = statement.sources.map((id) => number.get(id)).filter(Boolean).sort((a, b) => a - b);
      return refs.length ? el("sup", { class: "cite", text: ` [${refs.join(", ")}]` }) : null;
    };
    const line = (statement) => el("li", {}, statement.text, cite(statement));
    const block = (heading, statements) =>
      el("div", { class: "rec-block" }, el("h4", { text: heading }), el("ul", {}, statements.map(line)));

    const section = el(
      "section",
      { class: "recommendation", "aria-labelledby": "rec-title" },
      el("h3", { id: "rec-title", class: "section-title", text: "Recommendation" }),
      el(
        "p",
        { class: `urgency urgency-${rec.urgency.level}` },
        el("span", { class: "urgency-level", text: rec.urgency_label || rec.urgency.level.toUpperCase() }),
        " ",
        rec.urgency.text,
        cite(rec.urgency),
      ),
      el("p", { class: "rec-summary", text: rec.summary }),
      rec.negative_caution
        ? el("p", { class: "negative-caution", role: "note", "data-field": "negative-caution" }, el("strong", { text: rec.negative_caution }))
        : null,
      rec.detects ? el("p", { class: "muted small detects", text: `What the model detects: ${rec.detects}` }) : null,
    );
    if (rec.content_reviewed === false) {
      section.prepend(
        el(
          "p",
          { class: "draft-banner", role: "note", "data-field": "draft" },
          el("strong", { text: "DRAFT guidance: " }),
          "not approved by a clinical reviewer; not for clinical use until a reviewer signs it off.",
        ),
      );
    }
    if (rec.paediatric && rec.paediatric.length) {
      const heading = rec.age_group === "child" ? "Child: paediatric warnings" : "Age group not stated";
      section.append(
        el(
          "div",
          { class: `paediatric paediatric-${rec.age_group}`, "data-field": "paediatric" },
          el("h4", { text: heading }),
          el("ul", {}, rec.paediatric.map(line)),
        ),
      );
    }
    if (rec.review_by_radiologist) {
      section.append(
        el(
          "div",
          { class: "review" },
          el("strong", { text: "Radiologist review: " }),
          rec.review_advice || "",
          rec.review_reasons.length ? el("ul", {}, rec.review_reasons.map((r) => el("li", { text: r }))) : null,
        ),
      );
    }
    section.append(
      el(
        "div",
        { class: "rec-grid" },
        block("Immediate care", rec.immediate_care),
        block("Further imaging", rec.further_imaging),
        block("Referral", [rec.referral]),
        block("Follow-up", [rec.follow_up]),
        block("Red flags: seek emergency care", rec.red_flags),
      ),
      el("p", { class: "muted" }, "Scope: ", rec.scope.text, cite(rec.scope)),
      rec.trained_on ? el("p", { class: "muted", "data-field": "trained-on" }, "Training data: ", rec.trained_on.text, cite(rec.trained_on)) : null,
      el("h4", { text: "Sources" }),
      el(
        "ol",
        { class: "sources" },
        rec.sources.map((s) =>
          el(
            "li",
            {},
            s.url ? el("a", { href: s.url, rel: "noopener noreferrer", target: "_blank", text: s.title }) : s.title,
            `. ${s.section}.`,
          ),
        ),
      ),
      el("p", { class: "muted small", text: `Guidance content ${rec.content_version}. ${rec.content_status}` }),
    );
    return section;
  }

  function renderVersions(data) {
    const models = Object.entries(data.model_versions.models || {})
      .map(([name, v]) => `${name} ${v.version || (v.run_id ? v.run_id.slice(0, 8) : "?")}`)
      .join(" · ");
    return el(
      "p",
      { class: "muted small versions" },
      `Models: ${data.model_versions.bundle}`,
      data.model_versions.created ? ` (packaged ${data.model_versions.created})` : "",
      models ? ` · ${models}` : "",
      data.synthetic_models ? " · trained on SYNTHETIC data" : "",
    );
  }
})();
