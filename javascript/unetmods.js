// UNet Mods: tooltips for every control. The texts come from the parameter declarations (the
// script renders them as JSON into a hidden div); they go into the WebUI's `titles` map, which
// hints.js applies by label, and onto the labels already on the page.
(function () {
    function declaredTitles() {
        var all = {};
        gradioApp().querySelectorAll(".unetmods-titles").forEach(function (node) {
            try {
                Object.assign(all, JSON.parse(node.dataset.titles));
            } catch (e) {
                console.warn("[UNet Mods] cannot read tooltips", e);
            }
        });
        return all;
    }

    function applyTitles(map) {
        gradioApp().querySelectorAll("[id*='unet_mods'] span, [id*='unet_mods'] label").forEach(function (node) {
            var text = node.textContent.trim();
            if (map[text] && !node.title) node.title = map[text];
        });
    }

    var map = null;
    onUiLoaded(function () {
        map = declaredTitles();
        if (typeof titles !== "undefined") Object.assign(titles, map);
        applyTitles(map);
    });
    onUiUpdate(function () {
        if (map) applyTitles(map);  // accordions render their controls when first opened
    });
})();
